"""A Python callable as the other party: a scripted user that judges each agent turn (its reward)
and ends the conversation when it is satisfied or after four turns.

python examples/dialogue_scripted.py --episodes 2
"""

import argparse

import gymnasium as gym

from textenvs.responders import Reply


def picky_user(conversation):
    """Pays 1.0 when the agent's last turn names a town of the article, and then says goodbye."""
    article = conversation.messages[1]["content"]
    answer = conversation.messages[-1]["content"]
    named = [w.strip(".,") for w in answer.split() if w.istitle() and w.strip(".,") in article]
    if named or conversation.turn >= 4:
        return Reply("Thanks, that is all.", reward=1.0 if named else 0.0, end=True)
    return Reply("Which town was that in?", reward=0.0)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--episodes", type=int, default=2, help="conversations to play")
    args = p.parse_args(argv)

    env = gym.make(
        "textenvs/Dialogue-v0", responder=picky_user, max_turn_tokens=8, k=8, token_mode="topk"
    )
    env.action_space.seed(0)
    for episode in range(args.episodes):
        env.reset(seed=episode)
        total, terminated = 0.0, False
        while not terminated:
            _, reward, terminated, _, info = env.step(env.action_space.sample())
            total += reward
        print(
            f"episode {episode}: {info['turns']} turns, stop {info['stop']!r}, "
            f"judge's reward {info['responder_reward']}, return {total:.3f}"
        )


if __name__ == "__main__":
    main()
