"""The prompts the target answers to make the distillation corpus: built in code, no download.

Chat turns of three kinds, in a fixed order shuffled by the seed:
- question templates x topics (``TEMPLATES`` x ``TOPICS``: explain, list, compare, write a poem...);
- standalone requests (``REQUESTS``: how-to, advice, small maths, short code, rewriting);
- each rendered as a one-turn conversation with the model's chat template, or as plain text
  ``"Question: ...\\nAnswer:"`` for a model that ships none (the in-repo test models).

These are written for distillation and differ from the prompts ``tandem bench spec`` measures
with (bench/spec_prompts.py; a unit test checks that none of those is here).
"""

from __future__ import annotations

import random

TOPICS = [
    "the moon", "volcanoes", "coffee", "electric cars", "the Roman Empire", "honeybees", "black holes",
    "the human heart", "recycling", "the internet", "chess", "rain forests", "the printing press",
    "vaccines", "solar panels", "penguins", "the stock market", "jazz music", "earthquakes", "bread baking",
    "the ocean tides", "dinosaurs", "democracy", "glaciers", "the French Revolution", "DNA", "wind turbines",
    "sleep", "the Olympic Games", "mushrooms", "the speed of light", "ancient Egypt", "smartphones",
    "coral reefs", "gravity", "the piano", "climate change", "whales", "the Great Wall of China",
    "friendship", "public libraries", "tea", "magnets", "deserts", "the immune system", "trains",
    "the Renaissance", "clouds", "bicycles", "spiders", "nuclear energy", "the alphabet", "rivers",
    "video games", "time zones", "composting", "the brain", "kites", "maps", "birds migrating south",
]

TEMPLATES = [
    "What is {t}?",
    "Explain {t} to a ten-year-old.",
    "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.",
    "What are the pros and cons of {t}?",
    "How does {t} affect everyday life?",
    "Write a short story that involves {t}.",
    "Summarize the history of {t} in a few sentences.",
    "What are common misconceptions about {t}?",
    "List five questions a student might ask about {t}.",
    "Describe {t} in one paragraph.",
    "Why do people find {t} interesting?",
    "Write a haiku about {t}.",
    "How would you teach a friend about {t}?",
    "What is the most surprising thing about {t}?",
    "Can you tell me a joke about {t}?",
]

REQUESTS = [
    "How do I boil an egg so the yolk stays soft?",
    "Write a Python function that reverses a string.",
    "What is 17 times 23? Show your working.",
    "Give me a packing list for a beach holiday.",
    "How can I stay focused while studying?",
    "Rewrite this sentence to sound more polite: Give me the report now.",
    "What is the difference between weather and climate?",
    "Write an email asking my manager for a day off next Friday.",
    "How do I change a flat tire on a car?",
    "Suggest five names for a pet goldfish.",
    "What are some healthy snacks for children?",
    "Explain what a prime number is, with examples.",
    "Write a thank-you note to a teacher.",
    "How do I write a good cover letter?",
    "What is the boiling point of water at the top of a mountain, and why?",
    "Give me a simple workout I can do at home without equipment.",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "What is a noun? Give three examples.",
    "Plan a three-day trip to Paris.",
    "How do I keep houseplants alive?",
    "Write a SQL query that counts the rows of a table named orders.",
    "Convert 100 degrees Fahrenheit to Celsius.",
    "What should I do if I feel stressed at work?",
    "Describe how to make a paper airplane.",
    "What are the planets of the solar system, in order?",
    "Write a limerick about a cat who loves cheese.",
    "How does compound interest work?",
    "What is the past tense of 'swim', 'run' and 'bring'?",
    "Give me tips for a job interview.",
    "Explain the rules of tic-tac-toe.",
    "Write a bash command that lists the ten largest files in a folder.",
    "What are the main causes of traffic jams?",
    "How do I politely decline an invitation?",
    "What is the Pythagorean theorem?",
    "Write a short speech for a friend's birthday.",
    "How can I reduce my use of plastic?",
    "What is the difference between a list and a tuple in Python?",
    "Give me a recipe for a simple tomato soup.",
    "Why is it important to wear sunscreen?",
    "Write a product description for a reusable water bottle.",
]


def question_texts() -> list[str]:
    """Every prompt text, templates x topics first, then the standalone requests (no duplicates)."""
    texts = [t.format(t=topic) for t in TEMPLATES for topic in TOPICS] + list(REQUESTS)
    return list(dict.fromkeys(texts))


def choose_prompts(num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` texts: all of them shuffled by ``seed``, cycled if more are asked for (a
    repeat is sampled anew, so it gives another answer). ValueError for a count below 1."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num_prompts}")
    texts = question_texts()
    random.Random(seed).shuffle(texts)
    return [texts[i % len(texts)] for i in range(num_prompts)]


def render_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn: the model's chat template when it has one (the template writes
    the special tokens), else ``Question: ...\\nAnswer:`` as plain text."""
    if tokenizer.chat_template is not None:
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
    return tokenizer.encode(f"Question: {text}\nAnswer:", add_special_tokens=True)
