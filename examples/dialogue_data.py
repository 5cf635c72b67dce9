"""Conversations from the data: the agent plays the assistant of recorded dialogues, the recorded
user asks the next question after each of its turns. Greedy decoding over a batched env, then the
token ids and loss mask a trainer reads.

python examples/dialogue_data.py --conversations 8
"""

import argparse

import gymnasium as gym
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--conversations", type=int, default=8, help="conversations to play")
    args = p.parse_args(argv)

    envs = gym.make_vec("textenvs/Dialogue-v0", num_envs=args.conversations, max_turn_tokens=12)
    envs.reset(seed=0)
    done = np.zeros(envs.num_envs, dtype=bool)
    returns = np.zeros(envs.num_envs)
    while not done.all():
        greedy = envs.unwrapped.logits.argmax(-1).numpy()  # the env's own next-token logits
        _, rewards, terminated, _, infos = envs.unwrapped.step_unfinished(greedy)
        returns += rewards
        done |= terminated
    print(f"greedy return (sum of the turns' ROUGE-L): {returns.mean():.3f}")
    first = envs.unwrapped.envs[0]
    for message in first.conversation:
        print(f"  {message['role']:>9}: {message['content'][:70]!r}")
    ids, mask = first.sequence.ids, first.agent_mask()
    print(f"conversation 0: {len(ids)} token ids, {mask.sum()} of them the agent's (loss mask)")


if __name__ == "__main__":
    main()
