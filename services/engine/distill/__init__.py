"""``tandem distill``: train a draft model for speculative decoding from a target model.

The seed's teacher-student recipe: the target (teacher) answers prompts built in code
(prompts.py) with our engine, then scores every position of those sequences, keeping its top-K
next-token log-probabilities (teacher.py); a small Llama with the target's tokenizer (student.py)
learns them by KL divergence (loss.py, trainer.py). run.py drives the stages and makes them
resumable; cli.py is the command.
"""
