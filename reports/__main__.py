"""The command line: python -m reports --text "..." --json out.json

Bad input ends with one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from analysis import HeadscopeError, analyze, load_model
from analysis.loading import DEVICE_MAPS, DTYPES
from analysis.presets import FIJI

EXIT_BAD_INPUT = 2
NOT_UTF8 = "{path} is not UTF-8 text (bad byte at offset {offset}): save it as UTF-8 and try again."


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(EXIT_BAD_INPUT, f"headscope: error: {message} (see python -m reports --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m reports", description="Analyse attention heads and write the results.")
    parser.add_argument("--model", default="auto",
                        help="hub id, local checkpoint directory, or 'auto' (gpt2 if cached, else the bundled MiniLM)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text to analyse (default: the notebook's Fiji sentences)")
    source.add_argument("--text-file", type=Path, help="read the text from this UTF-8 file")
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--layer", type=int, action="append", metavar="N",
                        help="layer to analyse, 0-based; repeat for several (default: 6, or n_layers // 2)")
    layers.add_argument("--all-layers", action="store_true", help="analyse every layer")
    parser.add_argument("--include-first-token", action="store_true",
                        help="keep the first token in the means, stds and dot products")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="precision the model runs in; the measurements are computed in float32 either way")
    parser.add_argument("--device-map", choices=list(DEVICE_MAPS),
                        help="'auto': spread a model too large for one device over the GPUs and CPU memory "
                             "(Accelerate's big-model loading); --device is then not used")
    parser.add_argument("--json", type=Path, required=True, metavar="OUT", help="write the results JSON here ('-': stdout)")
    parser.add_argument("--patterns", action="store_true", help="include every [head][q][k] attention pattern")
    return parser


def read_text(args) -> str:
    if args.text_file is None:
        return FIJI if args.text is None else args.text
    try:
        data = args.text_file.read_bytes()
    except OSError as exc:
        raise HeadscopeError(f"Cannot read {args.text_file}: {exc.strerror}.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeadscopeError(NOT_UTF8.format(path=args.text_file, offset=exc.start)) from None


def default_layers(n_layers: int) -> list[int]:
    return [6] if n_layers > 6 else [n_layers // 2]


def write_json(data: dict, out: Path) -> None:
    payload = json.dumps(data, allow_nan=False)
    if str(out) == "-":
        sys.stdout.write(payload + "\n")
        return
    try:
        out.write_text(payload, encoding="utf-8")
    except OSError as exc:
        raise HeadscopeError(f"Cannot write {out}: {exc.strerror}.") from None


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run(args) -> None:
    text = read_text(args)
    _quiet_libraries()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    layers = None if args.all_layers else (args.layer or default_layers(loaded.info.n_layers))
    result = analyze(loaded, text, layers, exclude_first_token=not args.include_first_token)
    for warning in result.warnings:
        print(f"headscope: warning: {warning}", file=sys.stderr)
    write_json(result.to_dict(include_patterns=args.patterns), args.json)
    worst = max(layer.parity_max_abs_err for layer in result.layers.values())
    print(f"headscope: {loaded.info.id}, {result.n_tokens} tokens, layers {sorted(result.layers)}, "
          f"parity max abs err {worst:.1e} -> {args.json}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except HeadscopeError as exc:
        print(f"headscope: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
