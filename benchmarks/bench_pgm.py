#!/usr/bin/env python
"""Prototype selection: gkd_d2's closed-form joint matching pursuit vs the direct formulation.

    python -m benchmarks.bench_pgm [--n 2000] [--channels 256] [--prototypes 10] [--chunk 64]

The direct formulation is what the official code does: at every step it builds, for every
candidate atom, the reconstructions g w^T of the residuals in both spaces (K x C x N tensors,
here in chunks of --chunk candidates so that it fits in memory) and evaluates the joint objective
J_k = ||g_S w_S^T - R_S||^2 + ||g_T w_T^T - R_T||^2 + alpha ||w_S - w_T||^2 directly, in
float64 (the official runs fp16; float64 makes it the exact reference). gkd_d2 keeps only the
K x N correlations, updated by rank-1 steps, and maximises the equivalent score in fp32. Both run
on the same inputs (clustered random features, about 60 % candidates after the density filter)
in separate processes, one after the other; the script asserts identical picks and prints the
time and peak-memory ratios. The reference lives here for comparison only.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import in_fresh_process, report


def make_inputs(n: int, channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) student and teacher features of one class: 8 clusters, teacher = a noisy
    rotation of the student (so the two spaces agree roughly, as in training)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, channels, generator=g)
    assign = torch.randint(0, 8, (n,), generator=g)
    xs = centres[assign] + 0.6 * torch.randn(n, channels, generator=g)
    rot, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g))
    xt = xs @ rot + 0.3 * torch.randn(n, channels, generator=g)
    return xs.relu(), xt.relu()  # FPN-like non-negative features


def direct_pursuit(
    xs_hat: torch.Tensor,
    xt_hat: torch.Tensor,
    candidates: torch.Tensor,
    num_atoms: int,
    alpha: float,
    chunk: int,
) -> list[int]:
    """Reference: the joint objective of every candidate from materialised reconstructions."""
    xs_hat, xt_hat = xs_hat.double(), xt_hat.double()
    r_s, r_t = xs_hat.T.clone(), xt_hat.T.clone()  # (C, N) residuals
    g_s, g_t = xs_hat[candidates], xt_hat[candidates]  # (K, C)
    picks = []
    for _ in range(num_atoms):
        objective = []
        for k0 in range(0, len(candidates), chunk):
            gs, gt = g_s[k0 : k0 + chunk], g_t[k0 : k0 + chunk]
            u_s, u_t = gs @ r_s, gt @ r_t  # (k, N)
            w_s = ((1 + alpha) * u_s + alpha * u_t) / (1 + 2 * alpha)
            w_t = ((1 + alpha) * u_t + alpha * u_s) / (1 + 2 * alpha)
            rec_s = gs[:, :, None] * w_s[:, None, :]  # (k, C, N)
            rec_t = gt[:, :, None] * w_t[:, None, :]
            j = (
                (rec_s - r_s[None]).pow(2).sum(dim=(1, 2))
                + (rec_t - r_t[None]).pow(2).sum(dim=(1, 2))
                + alpha * (w_s - w_t).pow(2).sum(dim=1)
            )
            objective.append(j)
        k = int(torch.argmin(torch.cat(objective)))
        u_s, u_t = g_s[k] @ r_s, g_t[k] @ r_t
        w_s = ((1 + alpha) * u_s + alpha * u_t) / (1 + 2 * alpha)
        w_t = ((1 + alpha) * u_t + alpha * u_s) / (1 + 2 * alpha)
        r_s -= torch.outer(g_s[k], w_s)
        r_t -= torch.outer(g_t[k], w_t)
        picks.append(int(candidates[k]))
    return picks


def _run(method: str, args: dict, queue) -> None:
    """Child process: time one method on the shared inputs; report picks, seconds, peak RSS."""
    from gkd_d2.distill import dense_candidates, joint_matching_pursuit

    torch.set_num_threads(args["threads"])
    xs, xt = make_inputs(args["n"], args["channels"])
    xs_hat, xt_hat = F.normalize(xs, dim=1), F.normalize(xt, dim=1)
    candidates = torch.nonzero(dense_candidates(xs_hat, xt_hat)).flatten()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "closed_form":
        picks = joint_matching_pursuit(
            xs_hat, xt_hat, candidates, args["prototypes"], args["alpha"]
        ).tolist()
    else:
        picks = direct_pursuit(
            xs_hat, xt_hat, candidates, args["prototypes"], args["alpha"], args["chunk"]
        )
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss
    queue.put(
        {
            "picks": picks,
            "seconds": seconds,
            "peak_mib": peak_kib / 1024,
            "candidates": len(candidates),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--prototypes", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=10.0)
    parser.add_argument("--chunk", type=int, default=64, help="candidates per direct chunk")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = vars(parser.parse_args(argv))
    fast = in_fresh_process(_run, "closed_form", args)  # its peak RSS alone
    direct = in_fresh_process(_run, "direct", args)
    same = fast["picks"] == direct["picks"]
    rows = {
        "N": args["n"],
        "C": args["channels"],
        "candidates": fast["candidates"],
        "prototypes": args["prototypes"],
        "closed_form_s": round(fast["seconds"], 4),
        "direct_s": round(direct["seconds"], 3),
        "time_ratio": round(direct["seconds"] / fast["seconds"], 1),
        "closed_form_peak_mib": round(fast["peak_mib"], 1),
        "direct_peak_mib": round(direct["peak_mib"], 1),
        "memory_ratio": round(direct["peak_mib"] / max(fast["peak_mib"], 0.1), 1),
        "identical_picks": same,
    }
    report(rows, args["json"])
    print(
        f"closed form {rows['closed_form_s']} s vs direct {rows['direct_s']} s: "
        f"{rows['time_ratio']}x faster (target >= 20x); peak memory "
        f"{rows['closed_form_peak_mib']} vs {rows['direct_peak_mib']} MiB "
        f"({rows['memory_ratio']}x); identical picks: {same}"
    )
    if not same:
        print(f"picks differ: {fast['picks']} vs {direct['picks']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
