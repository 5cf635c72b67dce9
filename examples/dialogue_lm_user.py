"""A language model as the user: the env's model (or any causal LM) simulates the other party
with its own system prompt, sampling settings and seed, and its own KV cache; in a batched env
the users' turns of every conversation that needs one are generated in one batch.

python examples/dialogue_lm_user.py --conversations 4 --turns 3
"""

import argparse

import gymnasium as gym
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--conversations", type=int, default=4, help="conversations to play")
    p.add_argument("--turns", type=int, default=3, help="agent turns per conversation at most")
    p.add_argument("--user-model", default=None, help="a causal LM folder or hub name")
    args = p.parse_args(argv)

    envs = gym.make_vec(
        "textenvs/Dialogue-v0",
        num_envs=args.conversations,
        responder="lm",
        responder_kwargs={
            "model": args.user_model,  # None: the env's own model, no second copy
            "system": "You are a reader asking about the article.",
            "temperature": 0.8,
            "max_new_tokens": 16,
            "seed": 0,
        },
        max_turns=args.turns,
        max_turn_tokens=12,
        token_mode="topk",
        k=4,
        text_infos=True,
    )
    envs.reset(seed=0)
    envs.action_space.seed(0)
    done = np.zeros(envs.num_envs, dtype=bool)
    stops = [""] * envs.num_envs
    while not done.all():
        _, _, terminated, _, infos = envs.unwrapped.step_unfinished(envs.action_space.sample())
        for i in np.flatnonzero(infos["_reply"]):
            if infos["reply"][i]:
                print(f"conversation {i}, the simulated user: {infos['reply'][i][:60]!r}")
        for i in np.flatnonzero(terminated):
            stops[i] = infos["stop"][i]
        done |= terminated
    print("ended by:", stops)


if __name__ == "__main__":
    main()
