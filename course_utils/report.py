"""The pipeline report: ``report.md`` (tables, samples, plots) and ``metrics.json`` (every number)."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_open, write_json


def plot_history(history: list[dict], keys=("loss", "val_loss"), title: str = "", ax=None, log_y: bool = True):
    """Line plot of logged metrics against the step; returns the figure."""
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="." if key.startswith("val") else None, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig or ax.figure


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (shorter at the start), for noisy per-step curves."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def markdown_table(rows: list[dict], columns: dict[str, str]) -> str:
    """A Markdown table of ``rows``; ``columns`` maps each key to a format spec (``".3f"``, ``".0%"``, ``""``)."""
    def cell(v, spec):
        return "—" if v is None else format(v, spec) if spec else _md_escape(str(v))

    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k), spec) for k, spec in columns.items()) + " |" for r in rows]
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "∅"


def _peft_line(sft: dict) -> str:
    trainable, total = sft.get("trainable_parameters"), sft.get("total_parameters")
    if sft.get("peft", "none") == "none" or not total:
        return "Full fine-tuning (every parameter trained)."
    c = sft["config"]
    return (f"{'QLoRA (4-bit NF4 base)' if sft['peft'] == 'qlora' else 'LoRA'} r={c['lora_r']}, alpha={c['lora_alpha']}, "
            f"targets {c['lora_targets']}: {trainable:,} of {total:,} parameters trained ({trainable / total:.1%}).")


def _sft_section(sft: dict | None, out_dir: Path) -> list[str]:
    if not sft:
        return []
    import matplotlib.pyplot as plt

    fig = plot_history(sft["history"], keys=("loss",), title="SFT: loss on assistant tokens")
    fig.savefig(out_dir / "plots" / "sft_loss.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    b, a = sft["before"], sft["after"]
    rows = [("held-out accuracy (ground-truth judge)", "accuracy", "{:.0%}"),
            ("… on the unseen phrasing", "accuracy_unseen_phrasing", "{:.0%}"),
            ("mean true score (0–1)", "true_score", "{:.2f}"),
            ("format compliance (EOS, template)", "format_compliance", "{:.0%}"),
            ("stopped with EOS", "stopped_with_eos", "{:.0%}")]
    lines = ["", "## SFT (指令微调)", "",
             f"{sft['train_conversations']} conversations ({sft['config']['chat_format']}), {sft['steps']} steps; "
             f"{b['n']} held-out prompts answered greedily and judged by the tiny world's scorer. "
             f"Rows dropped for length: {sft['data']['dropped']}; prompts truncated: {sft['data']['truncated']}. "
             + _peft_line(sft), "",
             "| metric | pretrained base | after SFT |", "|---|---|---|"]
    lines += [f"| {name} | {fmt.format(b[k])} | {fmt.format(a[k])} |" for name, k, fmt in rows if k in a]
    if "accuracy_by_family" in a:
        lines += ["", "| task family | base | SFT |", "|---|---|---|"]
        lines += [f"| {f} | {b['accuracy_by_family'].get(f, 0):.0%} | {v:.0%} |" for f, v in a["accuracy_by_family"].items()]
    lines += ["", "![SFT loss](plots/sft_loss.png)", "", "### Samples before and after SFT (greedy)", "",
              "| prompt | pretrained base | after SFT |", "|---|---|---|"]
    lines += [f"| {_md_escape(s['prompt'])} | {_md_escape(s['before'])} | {_md_escape(s['after'])} |" for s in sft["samples"]]
    return lines


def _rm_section(rm: dict | None, out_dir: Path) -> list[str]:
    if not rm:
        return []
    import matplotlib.pyplot as plt

    from .reward import plot_rewards

    fig = plot_rewards(rm["after"])
    fig.savefig(out_dir / "plots" / "rm_rewards.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    b, a, c = rm["before"], rm["after"], rm["config"]
    removed = ", ".join(f"{k}: {v}" for k, v in rm["removed"].items() if v) or "nothing"
    lines = ["", "## Reward model (奖励建模)", "",
             f"{rm['rows']} labelled pairs (injected: {c['label_noise']:.0%} flipped labels, {c['duplicate_rate']:.0%} "
             f"duplicates, {c['tie_rate']:.0%} ties). Cleaning kept **{rm['kept']}** and removed {removed}; "
             f"flipped labels still in the kept set: {rm['flipped_left_after_cleaning']}; dropped as too long: "
             f"{rm['dropped_too_long']}. Length bias of the data: the chosen side is the longer one in "
             f"{rm['length_bias']['chosen_longer']:.0%} of pairs of unequal length. {rm['steps']} steps, Bradley–Terry loss.",
             "", "| held-out metric | untrained score head | trained RM |", "|---|---|---|",
             f"| pairwise accuracy ({a['pairs']} clean pairs) | {b['accuracy']:.1%} | {a['accuracy']:.1%} |",
             f"| ROC-AUC (chosen vs rejected rewards, pooled) | {b['roc_auc']:.3f} | {a['roc_auc']:.3f} |",
             f"| mean reward margin | {b['mean_margin']:.2f} | {a['mean_margin']:.2f} |",
             f"| Kendall τ(reward, length) | {b['reward_length_tau']:.2f} | {a['reward_length_tau']:.2f} |"]
    if "kendall_tau" in a:
        lines += [f"| Kendall τ with the true scorer, within prompt | {b['kendall_tau_within_prompt']:.2f} | "
                  f"{a['kendall_tau_within_prompt']:.2f} |",
                  f"| Kendall τ with the true scorer, all responses | {b['kendall_tau']:.2f} | {a['kendall_tau']:.2f} |"]
    lines += ["", "![reward distributions and calibration](plots/rm_rewards.png)"]
    return lines


def _rlhf_section(ppo: dict | None, dpo: dict | None, out_dir: Path) -> list[str]:
    """One table for SFT, PPO and DPO on the same held-out prompts, the PPO curves, and samples side by side."""
    runs = {name: m for name, m in (("ppo", ppo), ("dpo", dpo)) if m}
    if not runs:
        return []
    import matplotlib.pyplot as plt

    policies = {}
    for name, m in runs.items():
        policies.setdefault("sft", m["comparison"]["policies"]["sft"])
        policies[name] = m["comparison"]["policies"][name]
    first = next(iter(runs.values()))["comparison"]
    lines = ["", "## RLHF: PPO (近端策略优化) and DPO (直接偏好优化)", "",
             f"{first['prompts']} held-out prompts, {first['samples_per_prompt']} sampled answers each (temperature 1) "
             "and one greedy answer per policy. *True score*: the tiny world's scorer, which no policy was trained on; "
             "*RM*: the learned reward model PPO optimised; *KL*: log π − log π_ref summed over each sampled answer. "
             "Win-rate vs SFT counts a tie as half; per prompt, a policy wins when the mean true score of its answers "
             "is higher. The reference (SFT) model's weights were bit-identical after each stage.", "",
             "| policy | true score (sampled) | true score (greedy) | RM score | KL to SFT | win-rate vs SFT, prompts "
             "(W/T/L) | per answer | greedy | cut without EOS |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in policies.items():
        gold = "true_score" in m
        v, a, g = m.get("vs_baseline"), m.get("vs_baseline_per_sample"), m.get("vs_baseline_greedy")
        lines.append(f"| {name.upper()} | {m['true_score']:.3f} | {m['true_score_greedy']:.3f} | " if gold else
                     f"| {name.upper()} | – | – | ")
        lines[-1] += (f"{m['rm_score']:+.2f} | {m['kl']:.2f} | "
                      + (f"**{v['win_rate']:.1%}** ±{v['ci95']:.1%} ({v['win']:.0%}/{v['tie']:.0%}/{v['loss']:.0%}) | "
                         f"{a['win_rate']:.1%} | {g['win_rate']:.1%}" if v else "– | – | –")
                      + f" | {m['truncated']:.1%} |")
    if ppo:
        from .ppo import plot_history as plot_ppo

        fig = plot_ppo(ppo["history"])
        fig.savefig(out_dir / "plots" / "ppo.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        c, n = ppo["config"], ppo["counts"]
        control = (f"adaptive β (target KL {c['kl_target']}, started at {c['kl_beta']}, ended at {ppo['final_beta']:.3f}; "
                   f"mean KL per response after the first quarter of the steps {ppo['kl_after_warmup']:.2f}, "
                   f"{ppo['kl_after_warmup'] / c['kl_target'] - 1:+.0%} of the target)"
                   if c["kl_target"] else f"fixed β = {c['kl_beta']}")
        lines += ["", f"PPO: {ppo['steps']} steps × {c['rollout_batch']} rollouts, {c['ppo_epochs']} epochs of "
                  f"minibatches of {c['minibatch']}, lr {c['lr']}, {control}; {ppo['train_seconds']:.0f} s. Of "
                  f"{n['responses']} sampled responses, {n['truncated']} were cut at {c['max_new_tokens']} tokens "
                  f"without EOS (score − {c['no_eos_penalty']}), {n['empty']} were empty, {n['nan_scores']} had a NaN "
                  "score (dropped).", "", "![PPO curves](plots/ppo.png)"]
    if dpo:
        h, c = dpo["history"][-1], dpo["config"]
        source = ("on-policy pairs (best and worst of the SFT model's samples by RM score)" if c["pairs"] == "on_policy"
                  else "cleaned labelled preference pairs")
        lines += ["", f"DPO: {dpo['pairs']} {source}, {dpo['steps']} steps of {c['batch_size']}, "
                  f"β {c['beta']}, loss {c['loss_type']}, lr {c['lr']}; {dpo['train_seconds']:.0f} s. Last logged step: "
                  f"implicit-reward accuracy {h['accuracy']:.0%}, margin {h['margin']:+.2f} (chosen "
                  f"{h['chosen_reward']:+.2f}, rejected {h['rejected_reward']:+.2f})."]
    names = ["sft", *runs]
    samples = [dict(row) for row in first["samples"]]
    for name, m in runs.items():
        for row, other in zip(samples, m["comparison"]["samples"]):
            row[name] = other[name]
    lines += ["", "### Sampled answers side by side (first sample of each policy)", "",
              "| prompt | " + " | ".join(n.upper() for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += ["| " + " | ".join(_md_escape(r[k]) for k in ["prompt", *names]) + " |" for r in samples]
    return lines


def write_report(out_dir, metrics: dict) -> Path:
    """Write report.md, metrics.json and plots/ under ``out_dir``; return the report path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    lines = [f"# LLM Training Lab — pipeline report (profile `{metrics['profile']}`)", ""]
    lines += [f"Total time: {metrics['seconds']:.0f} s. Every number below is also in `metrics.json`.", ""]
    lines += ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in metrics["stage_seconds"].items()]
    pre = metrics["stages"].get("pretrain")
    if pre:
        fig = plot_history(pre["history"], title="pretraining: train and held-out loss")
        fig.savefig(out_dir / "plots" / "pretrain_loss.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        lines += [
            "", "## Pretraining (预训练)", "",
            f"{pre['parameters']:,}-parameter Llama, vocabulary {pre['vocab_size']}, {pre['steps']} steps "
            f"at {pre['tokens_per_s']:.0f} tokens/s.", "",
            "| held-out | before | after |", "|---|---|---|",
            f"| loss | {pre['val_loss_before']:.3f} | {pre['val_loss_after']:.3f} |",
            f"| perplexity | {pre['val_ppl_before']:.1f} | {pre['val_ppl_after']:.2f} |", "",
            f"Perplexity fell **{pre['ppl_reduction']:.0f}×**."
            + (f" Fact recall (complete \"Pip lives in …\" greedily for every world fact): "
               f"{pre['fact_recall_before']:.0%} → **{pre['fact_recall_after']:.0%}**." if pre.get("fact_recall_after") is not None else ""),
            "",
            "![pretraining loss](plots/pretrain_loss.png)", "",
            "### Samples before and after (same prompts, same sampling seed)", "",
            "| prompt | before training | after training |", "|---|---|---|",
        ]
        lines += [f"| {_md_escape(s['prompt'])} | {_md_escape(s['before'])} | {_md_escape(s['after'])} |" for s in pre["samples"]]
    lines += _sft_section(metrics["stages"].get("sft"), out_dir)
    lines += _rm_section(metrics["stages"].get("rm"), out_dir)
    lines += _rlhf_section(metrics["stages"].get("ppo"), metrics["stages"].get("dpo"), out_dir)
    if metrics["stages"].get("eval"):
        from .evaluation import report_lines

        lines += report_lines(metrics["stages"]["eval"], out_dir)
    report = out_dir / "report.md"
    with atomic_open(report) as f:
        f.write("\n".join(lines) + "\n")
    return report
