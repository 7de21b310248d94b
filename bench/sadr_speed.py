"""SADR's cost: seconds per optimisation step with and without the term, and seconds per ROME+SADR edit.

    python bench/sadr_speed.py --cases 10 --threads 2

1. Per step: for each case, ROME's v* optimisation on SmolLM2 (layer 5, the preset's templates) runs
   ``--steps`` steps with early stopping off, once plain and once with SADR (gamma 0.01, every layer),
   alternating in the same process; seconds / steps. The plain run uses the model's default attention
   kernel (what plain ROME uses); SADR switches to eager attention, which it needs for probabilities.
2. Per edit: ``rome+sadr`` at the preset's SADR settings with 80 steps and its usual early stop,
   whole edit (templates, k*, optimisation, update; the covariance statistics are precomputed).

Writes bench/results/sadr_speed.json. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from attnedit import __version__
from attnedit.core.data import load_cases
from attnedit.core.models import load_model
from attnedit.core.sites import Site
from attnedit.editing.base import method_templates, stats_spec, target_settings
from attnedit.editing.optimise import optimise_targets
from attnedit.editing.registry import make_editor
from attnedit.editing.sadr import SadrSettings, SadrTerm

# the official SADR code on this machine: ROME+SADR on SmolLM2, layer 5, gamma 0.01, 80 steps (issue 4)
OFFICIAL_SECONDS_PER_EDIT = 137.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/sadr_merged_counterfact.json")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--stats-corpus", default="../shared/data/wikitext2_test.txt,../shared/data/wikitext2_valid.txt"
    )
    ap.add_argument("--stats-samples", type=int, default=5000)
    ap.add_argument("--out", default="bench/results/sadr_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundle = load_model("smollm2-135m")
    cases = load_cases(args.data).cases[: args.cases]
    stats = {"stats_corpus": args.stats_corpus, "stats_samples": args.stats_samples}
    plain = make_editor("rome", bundle, overrides=stats)
    params = plain.params
    templates = method_templates(bundle, params)
    settings = target_settings(params)
    settings.steps, settings.early_stop_loss = args.steps, 0.0
    injection = [Site("mlp", params.layers[0])]
    term = SadrTerm(SadrSettings(gamma=0.01))

    per_step: dict[str, list[float]] = {"plain": [], "sadr": []}
    for case in cases:
        for name, terms in (("plain", []), ("sadr", [term])):
            t0 = time.perf_counter()
            result = optimise_targets(bundle, [case.request], templates, injection, settings, terms)
            seconds = time.perf_counter() - t0
            assert result.steps[0] == args.steps - 1
            per_step[name].append(seconds / args.steps)
        print(
            f"case {case.case_id}: plain {per_step['plain'][-1]:.4f} s/step, sadr {per_step['sadr'][-1]:.4f}"
        )

    editor = make_editor("rome+sadr", bundle, overrides={**stats, "steps": 80})
    from attnedit.editing.covariance import second_moments

    second_moments(
        bundle, "mlp_down", params.layers, stats_spec(params), progress=True
    )  # one-time, not timed
    per_edit, steps = [], []
    for case in cases:
        t0 = time.perf_counter()
        applied = editor.apply(bundle, [case])
        per_edit.append(time.perf_counter() - t0)
        steps.append(applied.edit.info["steps"][0] + 1)
        applied.revert()
        print(f"case {case.case_id}: rome+sadr {per_edit[-1]:.2f} s ({steps[-1]} steps)")

    plain_step, sadr_step = statistics.median(per_step["plain"]), statistics.median(per_step["sadr"])
    edit = statistics.median(per_edit)
    out = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
        },
        "versions": {"attnedit": __version__, "torch": torch.__version__},
        "data": args.data,
        "cases": len(cases),
        "steps": args.steps,
        "per_step": {
            "plain_median_s": plain_step,
            "sadr_median_s": sadr_step,
            "overhead_pct": 100 * (sadr_step / plain_step - 1),
            "plain_all": per_step["plain"],
            "sadr_all": per_step["sadr"],
        },
        "rome_sadr_edit": {
            "hyperparameters": editor.hyperparameters(),
            "median_s": edit,
            "all_s": per_edit,
            "steps_run": steps,
            "official_s": OFFICIAL_SECONDS_PER_EDIT,
            "speedup": OFFICIAL_SECONDS_PER_EDIT / edit,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k in ("per_step", "rome_sadr_edit")}, indent=1))


if __name__ == "__main__":
    main()
