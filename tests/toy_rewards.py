"""Toy rewards that a tiny random model can learn within a few steps, for the RL efficacy tests."""


def space_share(prompts, completions, **columns) -> list[float]:
    """Share of the answer's characters that are spaces: dense enough that random answers differ."""
    scores = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        scores.append(text.count(" ") / max(len(text), 1))
    return scores
