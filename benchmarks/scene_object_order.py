"""Do models keep their order from scene-centric to object-centric data? Reads the `suite.json` of
several `vlretrieval benchmark --suite configs/suites/scene_object.json` outputs (one per model)
and prints, as JSON, each model's mean recall per dataset and per group, the models' order in each
group, and Kendall's tau between the orders (1: the same order, -1: reversed).

  python benchmarks/scene_object_order.py RUN_A/benchmark RUN_B/benchmark ... [--markdown FILE]
"""

import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlretrieval import arguments
from vlretrieval.errors import UserError
from vlretrieval.evaluation.suite_report import group_means


def kendall_tau(first: list[str], second: list[str]) -> float:
    """Kendall's tau-a between two orders of the same items."""
    position = {name: index for index, name in enumerate(second)}
    pairs = list(itertools.combinations(first, 2))
    if not pairs:
        return 1.0
    agreeing = sum(1 if position[a] < position[b] else -1 for a, b in pairs)
    return agreeing / len(pairs)


def read_model(output: str) -> dict:
    path = os.path.join(output, "suite.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: give the folders `vlretrieval benchmark` wrote (--output)")
    with open(path) as handle:
        suite = json.load(handle)
    rows = [row for row in suite["results"] if row["task"] == "retrieval" and "skipped" not in row]
    return {"model": suite["model"].get("workdir", output), "groups": group_means(rows),
            "datasets": {row["name"]: row["metrics"]["mean_recall"] for row in rows}}


def compare(outputs: list[str]) -> dict:
    models = [read_model(output) for output in outputs]
    groups = sorted({group for model in models for group in model["groups"]})
    orders = {}
    for group in groups:
        scored = [model for model in models if group in model["groups"]]
        orders[group] = [m["model"] for m in sorted(scored, key=lambda m: -m["groups"][group])]
    taus = {}
    for first, second in itertools.combinations(groups, 2):
        shared = [name for name in orders[first] if name in orders[second]]
        taus[f"{first} vs {second}"] = kendall_tau(shared, [n for n in orders[second] if n in shared])
    return {"models": models, "order_by_group": orders, "kendall_tau": taus}


def markdown(comparison: dict) -> str:
    groups = list(comparison["order_by_group"])
    lines = ["| model | " + " | ".join(f"{g} mean recall" for g in groups) + " |",
             "|---|" + "---:|" * len(groups)]
    for model in comparison["models"]:
        lines.append(f"| {model['model']} | "
                     + " | ".join(f"{model['groups'][g]:.1f}" if g in model["groups"] else "" for g in groups) + " |")
    lines.append("")
    for group, order in comparison["order_by_group"].items():
        lines.append(f"- order on {group}: " + " > ".join(order))
    for pair, tau in comparison["kendall_tau"].items():
        kept = "kept" if tau == 1.0 else "not kept"
        lines.append(f"- Kendall's tau, {pair}: {tau:.2f} (the order is {kept})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = arguments.OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", help="folders written by `vlretrieval benchmark`")
    parser.add_argument("--markdown", help="also write the table and the orders to this file")
    args = parser.parse_args()
    comparison = compare(args.outputs)
    print(json.dumps(comparison, indent=1))
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown(comparison))


if __name__ == "__main__":
    arguments.run(main)
