"""The fixed prompts of ``tandem bench spec`` (written for it; nothing is downloaded).

- ``chat``: 32 open questions, the kind of turn whose answer shares few spans with the prompt.
- ``grounded``: 32 input-grounded requests: each of 8 short passages with each of 4 tasks that
  make the answer reuse the input (summarize, repeat, edit, answer from the text); this is
  where prompt lookup (n-gram) pays.

Each prompt is a one-turn conversation ``[{"role": "user", "content": ...}]``; ``render``
turns it into token ids with the model's chat template, or into plain text for a model that
ships none (the in-repo test models).
"""

from __future__ import annotations

CHAT = [
    "Why is the sky blue?",
    "Give me three tips for sleeping better.",
    "What is the difference between a virus and a bacterium?",
    "Explain how a bicycle stays upright while moving.",
    "Write a short poem about the sea.",
    "How do I make a cup of green tea?",
    "What causes the seasons on Earth?",
    "Suggest a name for a small bakery.",
    "What is photosynthesis?",
    "How can I learn to play the guitar?",
    "Why do cats purr?",
    "Describe a good morning routine.",
    "What is the tallest mountain in the world, and how tall is it?",
    "How does a refrigerator keep food cold?",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a weekend hiking trip?",
    "Explain what a computer program is to a child.",
    "Why do leaves change color in autumn?",
    "What are the benefits of drinking water?",
    "How do airplanes fly?",
    "Write a friendly message inviting a neighbor to dinner.",
    "What is the water cycle?",
    "How can I save money on groceries?",
    "What is the capital of Japan, and what is it known for?",
    "Explain why we have day and night.",
    "Give me a simple recipe for pancakes.",
    "What does a librarian do?",
    "How do bees make honey?",
    "Why is exercise good for the brain?",
    "Describe the planet Mars in a few sentences.",
    "What is a rainbow and how does it form?",
    "How do I start a small vegetable garden?",
]

# (passage, (old, new) for the edit task, a question the passage answers)
PASSAGES = [
    ("The town of Alderbrook sits at the bend of a slow green river. Every spring the river floods "
     "the low meadows, and the farmers move their sheep to the hills above the mill. The mill was "
     "built in 1850 and still grinds flour for the bakery on the square. On Saturdays the square "
     "fills with a market where people sell cheese, honey, apples and wool. Visitors often say that "
     "Alderbrook feels like a place where time runs a little slower than elsewhere.",
     ("Alderbrook", "Millford"), "When was the mill built?"),
    ("Maria opened her bicycle repair shop in a narrow street near the train station. At first she "
     "fixed only flat tires and loose chains, but soon people brought her old racing bikes, cargo "
     "bikes and even a tandem from 1962. She keeps a notebook for every bike she repairs, with the "
     "date, the parts she replaced and the name of the owner. Her shop is closed on Mondays, when "
     "she rides into the mountains to test the bikes she has rebuilt.",
     ("Maria", "Elena"), "On which day is the shop closed?"),
    ("The library's new reading room has tall windows facing north, so the light stays soft all "
     "day. There are forty desks, each with a small lamp and a power outlet. Phones must be set to "
     "silent, and food is not allowed, although water bottles with a lid are fine. The room opens "
     "at eight in the morning and closes at ten at night. Students say it is the quietest place on "
     "the whole campus during the exam weeks.",
     ("library", "museum"), "How many desks does the reading room have?"),
    ("To bake the bread, mix five hundred grams of flour with ten grams of salt and seven grams of "
     "dry yeast. Add three hundred and fifty milliliters of warm water and knead the dough for ten "
     "minutes until it is smooth. Cover the bowl and let the dough rise for one hour in a warm "
     "place. Shape it into a loaf, let it rest for another thirty minutes, then bake it at two "
     "hundred and twenty degrees for about thirty five minutes.",
     ("bread", "loaf"), "How long should the dough rise the first time?"),
    ("The lighthouse on Gull Island was lit for the first time in 1898. For eighty years a keeper "
     "lived there with his family, climbing the one hundred and twelve steps every evening to light "
     "the lamp. In 1978 the light was automated, and the keeper's house became a small museum. "
     "Today a ferry brings visitors to the island twice a day in summer. From the top of the tower "
     "you can see three other islands and, on clear days, the mainland coast.",
     ("lighthouse", "tower"), "When was the light automated?"),
    ("Our team meets every Tuesday at nine to plan the week. Each person lists what they finished, "
     "what they will work on next and anything that blocks them. The meeting lasts at most twenty "
     "minutes; longer discussions are moved to a separate call with only the people involved. "
     "Notes are written in the shared document and sent to everyone before noon. New team members "
     "are asked to read the last four weeks of notes during their first day.",
     ("Tuesday", "Thursday"), "How long does the meeting last at most?"),
    ("The red fox is found across most of the northern half of the world. It is a small, clever "
     "animal with a long bushy tail and a white tip at its end. Foxes eat mice, rabbits, birds, "
     "fruit and insects, and in towns they also search bins for food. They usually hunt alone at "
     "dusk and at night. In spring a pair raises four to six cubs in a den, which is often an old "
     "burrow dug by another animal.",
     ("fox", "wolf"), "How many cubs does a pair usually raise?"),
    ("The festival lasts three days at the end of August. On the first evening there is a parade "
     "with lanterns along the harbor. The second day is for music: twelve bands play on two stages "
     "in the park, from noon until midnight. On the last day the streets of the old town are closed "
     "to cars, and restaurants put their tables outside. The festival ends with fireworks over the "
     "water at ten o'clock.",
     ("festival", "carnival"), "How many bands play on the second day?"),
]

TASKS = [
    "Summarize the text above in two sentences.",
    "Repeat the text above exactly, word for word.",
    'Rewrite the text above with "{old}" replaced by "{new}" everywhere.',
    "Using only the text above, answer: {question}",
]


def grounded() -> list[str]:
    """The 32 input-grounded user turns, passage by passage (each with the 4 tasks in turn)."""
    out = []
    for passage, (old, new), question in PASSAGES:
        for task in TASKS:
            out.append(f"{passage}\n\n{task.format(old=old, new=new, question=question)}")
    return out


PROMPT_SETS = {"chat": CHAT, "grounded": grounded()}


def render(tokenizer, text: str) -> list[int]:
    """The prompt token ids of one user turn: the model's chat template when it has one, else
    the plain text followed by a newline."""
    if tokenizer.chat_template is not None:
        from services.engine.chat_prompt import chat_prompt_ids
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text + "\n")
