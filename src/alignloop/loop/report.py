"""A loop's ``report.md``: per iteration what feedback came in, what it trained, what the gate
decided and how long each step took; a plot of held-out reward (the hidden utility, with a
simulation) and win rate per version; the lineage table from the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignloop.loop.state import STEPS, iterations, read_json
from alignloop.report.markdown import md_cell, md_table
from alignloop.report.plots import figure


def write_loop_report(folder: Path, store: Any) -> Path:
    """``report.md`` in the loop's folder."""
    out = folder / "report.md"
    out.write_text("\n".join(["# alignloop loop", "", *loop_report_lines(folder, store)]) + "\n")
    return out


def loop_report_lines(folder: Path, store: Any, link_prefix: str = "") -> list[str]:
    """The loop's report as markdown lines; links into the loop's folder start with ``link_prefix``
    (for a report written elsewhere, like the demo's)."""
    meta = read_json(folder / "loop.json") or {}
    config = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
    its = iterations(folder)
    final = read_json(folder / "final-vs-v0.json")
    if meta.get("task"):
        return [*classifier_loop_lines(folder, meta, its, final, link_prefix), *time_lines(its), *registry_lines(store, config)]
    plot = plot_loop(its, final, folder / "loop.png")
    v0 = meta.get("v0", {}).get("version", "?")
    m = (final or {}).get("metrics", {})
    lines = opening_lines(
        f"Started from version `{v0}`. Each iteration: collect feedback → datasets → train → "
        "evaluate against the deployed version → promote only if the gate passes.",
        len(its), final, f"on held-out prompts: win rate {_pct(m.get('win_rate'))} (CI {_pct(m.get('win_rate_lower'))}–"
        f"{_pct(m.get('win_rate_upper'))}), reward {_num(m.get('baseline_reward_mean'))} → {_num(m.get('candidate_reward_mean'))}, "
        f"KL {_num(m.get('kl_per_token'))} per token.", plot, "reward and win rate per version", link_prefix)
    rows = []
    for it in its:
        s = it["steps"]
        collect, export, train = s.get("collect", {}), s.get("export", {}), s.get("train", {})
        verdict, promote = s.get("evaluate", {}), s.get("promote", {})
        m = verdict.get("metrics", {})
        counts = export.get("counts", {})
        given = collect.get("feedback")
        gate = "passed" if verdict.get("passed") else ("refused: " + "; ".join(verdict.get("reasons", [])) if verdict else "…")
        rows.append([
            str(it["iteration"]),
            ", ".join(f"{k} {v}" for k, v in given.items()) if given else "—",
            f"{export.get('feedback_rows', '…')} / {s.get('register', {}).get('feedback_rows', '—')}",
            " / ".join(str(counts.get(k, "…")) for k in ("pairs", "kto", "sft", "ratings")),
            ", ".join(train.get("stages", [])) or "—",
            f"`{s.get('register', {}).get('version')}`" if s.get("register", {}).get("version") else "—",
            f"{_num(m.get('baseline_reward_mean'))} → {_num(m.get('candidate_reward_mean'))}" if m else "—",
            f"{_pct(m.get('win_rate'))} ({_pct(m.get('win_rate_lower'))}–{_pct(m.get('win_rate_upper'))})" if m else "—",
            _num(m.get("kl_per_token")),
            md_cell(gate, 200),
            f"`{promote.get('deployed')}`" if promote else "…",
        ])
    lines += ["## Iterations", "",
              *md_table(("iter", "feedback given", "rows in datasets / behind the candidate", "pairs / kto / sft / ratings",
                         "trained", "candidate", "reward: deployed → candidate", "win rate (CI)", "KL/token", "gate",
                         "deployed after"), rows)]
    lines += ["", "Evaluation reports: " + ", ".join(f"[iter {it['iteration']}]({link_prefix}iter-{it['iteration']}/evaluate/report.md)"
                                                    for it in its if (folder / f"iter-{it['iteration']}/evaluate/report.md").is_file()), ""]
    return [*lines, *time_lines(its), *registry_lines(store, config)]


def time_lines(its: list[dict]) -> list[str]:
    rows = []
    for it in its:
        seconds = [it["steps"].get(k, {}).get("seconds") for k in STEPS]
        total = sum(x for x in seconds if x is not None)
        rows.append([str(it["iteration"]), *("…" if x is None else f"{x:.1f}" for x in seconds), f"{total:.1f}"])
    return ["## Time per step (seconds)", "", *md_table(("iter", *STEPS, "total"), rows)]


def opening_lines(about: str, iterations: int, final: dict | None, net_effect: str, plot: Path | None, alt: str,
                  link_prefix: str) -> list[str]:
    """What the loop does, its net effect (the deployed version against v0, ``net_effect``), the plot."""
    lines = [about, ""]
    if final and not final.get("same_as_v0"):
        lines += [f"**After {iterations} iterations** the deployed version `{final['version']}` against v0 {net_effect} "
                  f"Details: [final-vs-v0/report.md]({link_prefix}final-vs-v0/report.md).", ""]
    elif final:
        lines += [f"**After {iterations} iterations** v0 is still deployed: no candidate passed the gate.", ""]
    if plot:
        lines += [f"![{alt}]({link_prefix}{plot.name})", ""]
    return lines


def registry_lines(store: Any, config: str) -> list[str]:
    """The lineage table from the registry, then the loop's config."""
    lines = ["", "## Lineage (the model registry)", "",
              "`alignloop lineage VERSION` lists the exact feedback rows behind a version; `alignloop deploy VERSION` rolls back.", ""]
    rows = []
    for row in store.models():
        evaluation = row.get("evaluation") or {}
        verdict = "passed" if evaluation.get("passed") else ("refused" if evaluation else "—")
        rows.append([f"`{row['version']}`", f"`{row['parent_version']}`" if row.get("parent_version") else "—",
                     str(row.get("feedback_rows", 0)), "yes" if row.get("deployed") else "", verdict,
                     md_cell(str(row["path"]), 120)])
    lines += md_table(("version", "parent", "feedback rows", "deployed", "evaluation", "path"), rows)
    if config:
        lines += ["", "## Config", "", "```yaml", config.rstrip(), "```"]
    return lines


def classifier_loop_lines(folder: Path, meta: dict, its: list[dict], final: dict | None, link_prefix: str) -> list[str]:
    """A classifier loop's summary and iteration table: verdicts in, records out, F1 of the
    deployed model and of its candidate on held-out labelled data, the gate's verdict."""
    f1 = "macro_f1" if meta["task"] == "classification" else "micro_f1"
    f1_name = "macro-F1" if f1 == "macro_f1" else "entity micro-F1"
    plot = plot_classifier_loop(its, final, f1, f1_name, folder / "loop.png")
    v0 = meta.get("v0", {}).get("version", "?")
    m = (final or {}).get("metrics", {})
    lines = opening_lines(
        f"Started from version `{v0}` ({meta['task']}). Each iteration: people (or simulated labellers) mark the "
        "served classifier's predictions correct or wrong → bandit records → train → evaluate against the "
        "deployed version on held-out labelled data → promote only if the gate passes.",
        len(its), final, f"on held-out labelled data: {f1_name} {_num(m.get(f'baseline_{f1}'))} → {_num(m.get(f'candidate_{f1}'))} "
        f"(Δ {_num(m.get(f'{f1}_delta'))}, 95% CI {_num(m.get(f'{f1}_delta_lower'))} to {_num(m.get(f'{f1}_delta_upper'))}).",
        plot, f"{f1_name} per version", link_prefix)
    rows = []
    for it in its:
        s = it["steps"]
        collect, export, train = s.get("collect", {}), s.get("export", {}), s.get("train", {})
        verdict, promote = s.get("evaluate", {}), s.get("promote", {})
        m = verdict.get("metrics", {})
        gate = "passed" if verdict.get("passed") else ("refused: " + "; ".join(verdict.get("reasons", [])) if verdict else "…")
        said, right = collect.get("said_correct"), collect.get("shown_accuracy")
        rows.append([
            str(it["iteration"]),
            f"{collect['verdicts']} ({_pct(said)} said correct; {_pct(right)} were)" if "verdicts" in collect else "—",
            f"{export.get('counts', {}).get('bandit', '…')} / {s.get('register', {}).get('feedback_rows', '—')}",
            ", ".join(train.get("stages", [])) or "—",
            f"`{s.get('register', {}).get('version')}`" if s.get("register", {}).get("version") else "—",
            f"{_num(m.get(f'baseline_{f1}'))} → {_num(m.get(f'candidate_{f1}'))}" if m else "—",
            f"{_num(m.get(f'{f1}_delta'))} ({_num(m.get(f'{f1}_delta_lower'))} to {_num(m.get(f'{f1}_delta_upper'))})" if m else "—",
            md_cell(gate, 200),
            f"`{promote.get('deployed')}`" if promote else "…",
        ])
    lines += ["## Iterations", "",
              *md_table(("iter", "verdicts", "records / rows behind the candidate", "trained", "candidate",
                         f"{f1_name}: deployed → candidate", "Δ (95% CI)", "gate", "deployed after"), rows)]
    lines += ["", "Evaluation reports (classification reports, confusion matrices): " + ", ".join(
        f"[iter {it['iteration']}]({link_prefix}iter-{it['iteration']}/evaluate/report.md)"
        for it in its if (folder / f"iter-{it['iteration']}/evaluate/report.md").is_file()), ""]
    return lines


def plot_classifier_loop(its: list[dict], final: dict | None, f1: str, f1_name: str, out: Path) -> Path | None:
    """Held-out F1 of the deployed version at each iteration's start and of its candidate (with the
    paired 95% interval of the difference drawn around the candidate), promotions marked."""
    rows = [(it["iteration"], it["steps"]["evaluate"]["metrics"], it["steps"]["evaluate"].get("passed"))
            for it in its if it["steps"].get("evaluate", {}).get("metrics")]
    if not rows:
        return None
    with figure(out, figsize=(6.5, 4)) as (fig, ax):
        xs = [i for i, _, _ in rows]
        base = [m[f"baseline_{f1}"] for _, m, _ in rows]
        cand = [m[f"candidate_{f1}"] for _, m, _ in rows]
        ax.plot(xs, base, "o-", label="deployed at the iteration's start")
        low = [b + m.get(f"{f1}_delta_lower", c - b) for b, c, (_, m, _) in zip(base, cand, rows)]
        high = [b + m.get(f"{f1}_delta_upper", c - b) for b, c, (_, m, _) in zip(base, cand, rows)]
        ax.errorbar(xs, cand, yerr=[[c - lo for c, lo in zip(cand, low)], [hi - c for c, hi in zip(cand, high)]],
                    fmt="s", capsize=4, linestyle="--", label="candidate (95% CI of the difference)")
        for x, c, (_, _, passed) in zip(xs, cand, rows):
            ax.annotate("promoted" if passed else "refused", (x, c), textcoords="offset points", xytext=(8, 0),
                        fontsize=8, va="center")
        if final and final.get("metrics"):
            m = final["metrics"]
            ax.plot([xs[-1] + 1], [m[f"candidate_{f1}"]], "D", color="tab:green", label="deployed at the end")
            ax.set_xticks([*xs, xs[-1] + 1], [*map(str, xs), "end"])
        else:
            ax.set_xticks(xs)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"held-out {f1_name}")
        ax.set_title(f"{f1_name} per version")
        ax.legend(fontsize=8)
    return out


def plot_loop(its: list[dict], final: dict | None, out: Path) -> Path | None:
    """Left: held-out reward of the deployed version at each iteration's start and of its candidate.
    Right: each candidate's win rate against the deployed version with its CI, and the final
    deployed version against v0."""
    rows = [(it["iteration"], it["steps"]["evaluate"]["metrics"]) for it in its
            if it["steps"].get("evaluate", {}).get("metrics")]
    if not rows:
        return None
    with figure(out, 1, 2, figsize=(10, 4)) as (fig, (left, right)):
        xs = [i for i, _ in rows]
        left.plot(xs, [m.get("baseline_reward_mean") for _, m in rows], "o-", label="deployed at start")
        left.plot(xs, [m.get("candidate_reward_mean") for _, m in rows], "s--", label="candidate")
        passed = [it["iteration"] for it in its if it["steps"].get("evaluate", {}).get("passed")]
        for i, m in rows:
            if i in passed:
                left.annotate("promoted", (i, m.get("candidate_reward_mean")), textcoords="offset points", xytext=(0, 8),
                              ha="center", fontsize=8)
        left.set_xticks(xs)
        left.set_xlabel("iteration")
        hidden = all(str(it["steps"]["evaluate"].get("reward", "")).startswith("alignloop.envs.") for it in its if it["steps"].get("evaluate"))
        left.set_ylabel("simulated users' hidden utility (mean)" if hidden else "reward (mean)")
        left.set_title("held-out prompts: deployed vs candidate")
        left.legend()
        wins = [m.get("win_rate") for _, m in rows]
        errors = [[w - m.get("win_rate_lower", w) for w, (_, m) in zip(wins, rows)],
                  [m.get("win_rate_upper", w) - w for w, (_, m) in zip(wins, rows)]]
        right.errorbar(xs, wins, yerr=errors, fmt="o", capsize=4, label="candidate vs deployed")
        ticks, labels = list(xs), [str(x) for x in xs]
        if final and final.get("metrics"):
            m = final["metrics"]
            right.errorbar([xs[-1] + 1], [m["win_rate"]], yerr=[[m["win_rate"] - m["win_rate_lower"]], [m["win_rate_upper"] - m["win_rate"]]],
                           fmt="D", color="tab:green", capsize=4, label="final deployed vs v0")
            ticks.append(xs[-1] + 1)
            labels.append("final\nvs v0")
        right.set_xticks(ticks, labels)
        right.axhline(0.5, color="grey", linestyle=":")
        right.set_ylim(0, 1)
        right.set_xlabel("iteration")
        right.set_ylabel("win rate (95% CI)")
        right.set_title("win rate")
        right.legend(fontsize=8)
    return out


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.3f}"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"
