"""The harness's picture (`l2c_jax.compare_methods`, WORKDIR/pareto.png): FID, or the paired FID gap and PSNR,
against computed share, a panel per step count and a line per method."""

from __future__ import annotations

from typing import Optional

import numpy as np

from l2c_jax.errors import ConfigError


def _series(row) -> str:
    """The line a row joins in the picture: its method, TaylorSeer split by where its full steps are."""
    if row["method"] != "taylorseer":
        return row["method"]
    base = str(row["setting"]).partition("/")[0]
    if base.startswith("search"):
        return "taylorseer, searched full steps"
    if base.startswith("warp") or "," in base:
        return "taylorseer, warped full steps"
    return "taylorseer" if base.isdigit() else f"taylorseer {base}"


def plot_pareto(rows, path: str, paired: bool = False, solver: str = "DDIM") -> Optional[str]:
    """FID (mean ± sd over seeds) against computed share, a panel per step count, a line per method.

    solver: what a panel counts ("DDIM" steps, U-ViT's "NFE").
    paired: instead, the paired FID gap to full (FID − full seed by seed, mean ± sd) above and PSNR to full
    below, TaylorSeer's rows split by how their full steps are placed (the frontier near full, where
    unpaired spreads hide every difference)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("the Pareto picture needs matplotlib: pip install 'l2c_jax[plots]'") from e
    rows = [r for r in rows if r["dtype"] == "float32"]
    # FID where it was computed; else fidelity to the full sampler (PSNR, higher is better).
    key, label = (("fid_mean", "FID (mean ± sd over seeds)") if any(r["fid_mean"] is not None for r in rows)
                  else ("psnr_to_full", "PSNR to the full sampler (dB)"))
    rows = [r for r in rows if r[key] is not None and np.isfinite(r[key]) or r["method"] == "full"]
    if not rows:
        return None
    paired = paired and key == "fid_mean"
    panels = [("fid_gap_mean", "fid_gap_sd", "FID − full, paired (mean ± sd over seeds)"),
              ("psnr_to_full", None, "PSNR to the full sampler (dB)")] if paired else [(key, "fid_sd", label)]
    steps = sorted({r["reference_steps"] for r in rows})
    fig, axes = plt.subplots(len(panels), len(steps), figsize=(6.5 * len(steps), 4.8 * len(panels)), squeeze=False)
    for col, n in enumerate(steps):
        these = [r for r in rows if r["reference_steps"] == n]
        for ax, (y, err, ylabel) in zip(axes[:, col], panels):
            series = _series if paired else (lambda r: r["method"])
            for m in dict.fromkeys(series(r) for r in these):
                pts = sorted((r for r in these if series(r) == m), key=lambda r: r["computed_share"])
                if m == "full":
                    if y in ("fid_mean", "fid_gap_mean"):
                        ax.axhline(pts[0][y], color="k", lw=0.8, ls=":", label=f"full {solver} {n}")
                    continue
                ax.errorbar([p["computed_share"] for p in pts], [p[y] for p in pts],
                            yerr=[(p[err] or 0) if err else 0 for p in pts], marker="o", ms=4, capsize=3, label=m)
            ax.set_xlabel("computed share of unit evaluations")
            ax.set_ylabel(ylabel)
            if y == "fid_mean":
                ax.set_yscale("log")  # the methods span two orders of magnitude; the good ones sit near full
            ax.set_title(f"{solver} {n}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
