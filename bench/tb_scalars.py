"""Print a run's TensorBoard scalars: first, mean of the last N, and last value of each tag.

    python bench/tb_scalars.py lightning_logs/ovis2_5-9b-sft/tb [--tags perf/,train/loss] [--last 10]
"""

from __future__ import annotations

import argparse

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir")
    parser.add_argument("--tags", default="", help="comma list of tag prefixes (default: all)")
    parser.add_argument("--last", type=int, default=10, help="average the last N values")
    args = parser.parse_args()
    events = EventAccumulator(args.logdir, size_guidance={"scalars": 0})
    events.Reload()
    prefixes = [p for p in args.tags.split(",") if p]
    print(f"{'tag':<32} {'steps':>6} {'first':>12} {'mean last':>12} {'last':>12}")
    for tag in sorted(events.Tags()["scalars"]):
        if prefixes and not tag.startswith(tuple(prefixes)):
            continue
        values = [e.value for e in events.Scalars(tag)]
        tail = values[-args.last :]
        print(f"{tag:<32} {len(values):>6} {values[0]:>12.4g} {sum(tail) / len(tail):>12.4g} {values[-1]:>12.4g}")


if __name__ == "__main__":
    main()
