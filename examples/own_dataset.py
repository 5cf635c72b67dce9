"""Your own data: a JSONL file of {"source": ..., "references": [...]} lines becomes an env with
the metric of your choice, split into train / validation / test by a seed.

    python examples/own_dataset.py --out my_data.jsonl
"""

import argparse
import json

import gymnasium as gym

PAIRS = [
    ("The council approved the new park on Monday after a long debate.", "Council approves park"),
    ("Heavy rain closed three roads in the north of the city overnight.", "Rain closes roads"),
    ("The museum will open a new science wing to visitors next spring.", "Museum opens wing"),
    ("Local farmers reported a record apple harvest this autumn.", "Record apple harvest"),
    ("A new bus line will link the station and the hospital from May.", "New bus line to hospital"),
]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="my_data.jsonl", help="where the example file is written")
    args = p.parse_args(argv)

    with open(args.out, "w", encoding="utf-8") as f:
        for source, reference in PAIRS:
            f.write(json.dumps({"source": source, "references": [reference]}) + "\n")

    env = gym.make(
        "textenvs/Generate-v0",
        dataset=args.out,
        reward="chrf",  # or rouge1 / rouge2 / rougeL / bleu / ter / a callable
        dataset_kwargs={
            "prompt_template": "Article: {source}\nHeadline:",
            "split_fractions": (0.6, 0.2, 0.2),
            "split_seed": 0,
        },
        max_steps=8,
        token_mode="topk",  # action i: the LM's i-th most likely token
        k=4,
    )
    obs, info = env.reset(seed=0)
    print(f"{len(env.unwrapped.samples)} train samples; prompt {info['prompt']!r}")
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    print(f"text {info['text']!r}: {info['metric_name']} {info['metric']:.2f}")


if __name__ == "__main__":
    main()
