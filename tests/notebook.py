"""The course notebook's own cells (../shared/seed/000_7fdf1f42911a2986.txt), run as a function.

Only the plotting is left out and the global model, tokenizer, text and layer became arguments; every
computing line is the notebook's, so these numbers are the ground truth headscope must reproduce.
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats


def run_notebook(model, tokenizer, txt, whichlayer):
    # some helpful variables
    nheads = model.config.n_head
    head_dim = model.config.n_embd // nheads
    sqrtD = torch.sqrt(torch.tensor(head_dim))  # used for attention equation

    # hook the query vectors
    activations = {}
    keyName = f"attn_{whichlayer}"

    def implant_hook(layer_number):
        def hook(module, input, output):
            activations[keyName] = output.detach()

        return hook

    handle = model.h[whichlayer].attn.c_attn.register_forward_hook(implant_hook(whichlayer))

    # tokenize
    tokens = tokenizer.encode(txt, return_tensors="pt")
    ntokens = len(tokens[0])

    # run through the model
    with torch.no_grad():
        model(tokens)
    handle.remove()

    # first, separate the Q,K,V matrices
    Q, K, V = torch.split(activations[keyName][0, :, :], model.config.n_embd, dim=1)  # noqa: RUF059 (as written)
    Q_h = torch.split(Q, head_dim, dim=1)
    K_h = torch.split(K, head_dim, dim=1)

    # averages and standard deviations over all vectors and all tokens
    Qh_means = np.array([q[1:].mean() for q in Q_h])
    Qh_stds = np.array([q[1:].std() for q in Q_h])
    Kh_means = np.array([k[1:].mean() for k in K_h])
    Kh_stds = np.array([k[1:].std() for k in K_h])

    samehead_dp = np.array([])
    diffhead_dp = np.array([])
    for qi in range(nheads):
        for ki in range(nheads):
            # dot product for last token in Q with all previous tokens in K (excluding first token)
            dp = Q_h[qi][-1, :] @ K_h[ki][1:-1, :].t()
            if qi == ki:
                samehead_dp = np.concatenate((samehead_dp, dp))
            else:
                diffhead_dp = np.concatenate((diffhead_dp, dp))

    final2prev = np.array([])
    selfAttend = np.array([])
    firstSelf = np.array([])
    patterns = []
    for qi in range(nheads):
        # raw attention scores with mask
        attn_scores = (Q_h[qi] @ K_h[qi].t()) / sqrtD
        pastmask = torch.tril(torch.ones(ntokens, ntokens))
        attn_scores[pastmask == 0] = -torch.inf

        # softmax
        attn_sm = F.softmax(attn_scores, dim=-1)
        patterns.append(attn_sm.numpy())

        final_with_prev = attn_sm[-1, :-1]
        matching_toks = torch.diag(attn_sm[1:, 1:])  # exclude the first token in the sequence
        first_selfTok = attn_sm[0, 0].unsqueeze(0)  # isolate the first token

        final2prev = np.concatenate((final2prev, final_with_prev))
        selfAttend = np.concatenate((selfAttend, matching_toks))
        firstSelf = np.concatenate((firstSelf, first_selfTok))

    smx = np.linspace(0, 1, 300)
    y = stats.gaussian_kde(final2prev)(smx)
    kde_final = y / y.max()
    y = stats.gaussian_kde(selfAttend)(smx)
    kde_self = y / y.max()

    return {
        "Q_h": Q_h,
        "K_h": K_h,
        "q_means": Qh_means,
        "q_stds": Qh_stds,
        "k_means": Kh_means,
        "k_stds": Kh_stds,
        "same_head_dp": samehead_dp,
        "diff_head_dp": diffhead_dp,
        "final_to_prev": final2prev,
        "self_attention": selfAttend,
        "first_self": firstSelf,
        "patterns": np.stack(patterns),
        "kde": {"grid": smx, "final_to_prev": kde_final, "self_attention": kde_self},
    }
