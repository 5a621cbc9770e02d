"""``--plot``: hit ratio against capacity for a replay sweep (or, with ``--nodes``, per route
beside the pooled cache), drawn with matplotlib.

matplotlib is the optional extra ``plot`` (``pip install -e '.[plot]'`` in a checkout) and is imported
only here, only when a plot is asked for. :func:`require_matplotlib` is called before the sweep
runs, so a missing extra costs one error line, not a wasted sweep.
"""

from __future__ import annotations

from tierstore.errors import ConfigError

MISSING = ("--plot needs matplotlib: pip install matplotlib (in a checkout of tierstore: "
           "pip install -e '.[plot]')")


def require_matplotlib():
    """The pyplot module on the non-interactive Agg backend. Raises ConfigError if missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(MISSING) from None
    return plt


def plot_sweep(result: dict, path: str) -> None:
    """Write a PNG (or any format matplotlib infers from ``path``): one line per policy and per
    reference row, block hit ratio against capacity (log x axis, labelled as given)."""
    plt = require_matplotlib()
    caps = result["capacities"]
    xs = [c["capacity_blocks"] for c in caps]
    rows: dict[str, dict[str, float]] = {}
    for r in result["results"] + result["references"]:
        rows.setdefault(r["policy"], {})[r["capacity"]] = r["block_hit_ratio"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"belady": dict(color="black", linestyle="--"), "infinite": dict(color="grey", linestyle=":")}
    for name, by_cap in rows.items():
        ax.plot(xs, [by_cap.get(c["capacity"]) for c in caps], marker="o", label=name,
                **styles.get(name, {}))
    if len(xs) > 1 and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([c["capacity"] for c in caps])
    ax.minorticks_off()
    ax.set_xlabel("capacity (as given; tokens unless a unit says otherwise)")
    ax.set_ylabel("block hit ratio")
    ax.set_ylim(bottom=0)
    ax.set_title(f"replay of {result['trace']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as e:   # ValueError: an extension matplotlib cannot write
        raise ConfigError(f"cannot write plot {path}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        plt.close(fig)


def plot_routes(result: dict, path: str) -> None:
    """Bar chart of a cluster replay (``--nodes``): the cluster block and token hit ratio of
    each route beside the pooled cache of the same total size."""
    plt = require_matplotlib()
    rows = result["routes"] + [result["pooled"]]
    names = [f"{r['route']}\n({r['nodes']} x {r['capacity_blocks_per_node']:,} blocks)"
             for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    w = 0.38
    b1 = ax.bar([x - w / 2 for x in xs], [r["block_hit_ratio"] for r in rows], w,
                label="block hit ratio")
    b2 = ax.bar([x + w / 2 for x in xs], [r["token_hit_ratio"] for r in rows], w,
                label="token hit ratio")
    for bars in (b1, b2):
        for b in bars:
            ax.annotate(f"{b.get_height():.3f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("cluster hit ratio")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{result['nodes']} nodes x {result['capacity']} ({result['policy']}): routing "
                 f"by KV events vs one pooled cache\n{result['trace']}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot write plot {path}: {getattr(e, 'strerror', None) or e}") from None
    finally:
        plt.close(fig)
