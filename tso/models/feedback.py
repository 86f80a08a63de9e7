"""Scored feedback for the real-checkpoint example's judge (evaluation correction at stage 0).

SmolLM2-135M-Instruct does not follow a judging instruction (measured: 0 of 18 answers held a score
with either answer format), so the example corrects a judge from the base, as the method does. The
feedback is synthetic AI feedback over short factual questions: for each, a correct concise answer,
a correct but wordy one, a wrong one, another question's answer and one cut off mid-sentence, each
with the score and evidence a careful grader would give. ``python -m tso.models.feedback OUT``
writes it; the shipped copy is ``tso/configs/prompts/real-feedback.jsonl`` (a test keeps the two equal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tso.method.judging import format_judge_answer, render_judge_prompt

RUBRIC = "Rate how correct, helpful and concise the assistant's answer is."

# (question, correct answer, a wrong answer); none of them is an evaluation prompt of the example
FACTS: tuple[tuple[str, str, str], ...] = (
    ("What is 3 plus 4?", "3 plus 4 is 7.", "3 plus 4 is 8."),
    ("What is 12 minus 5?", "12 minus 5 is 7.", "12 minus 5 is 6."),
    ("What is 6 times 7?", "6 times 7 is 42.", "6 times 7 is 36."),
    ("What is 81 divided by 9?", "81 divided by 9 is 9.", "81 divided by 9 is 8."),
    ("What is 10 squared?", "10 squared is 100.", "10 squared is 20."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.", "There are 100 minutes in an hour."),
    ("How many days are in a week?", "A week has 7 days.", "A week has 5 days."),
    ("How many months are in a year?", "A year has 12 months.", "A year has 10 months."),
    ("How many sides does a triangle have?", "A triangle has 3 sides.", "A triangle has 4 sides."),
    ("How many continents are there?", "There are 7 continents.", "There are 5 continents."),
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Lyon."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "The capital of Germany is Munich."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "The capital of Spain is Barcelona."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "The capital of Canada is Toronto."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra.", "The capital of Australia is Sydney."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "The capital of Egypt is Alexandria."),
    ("What is the capital of Brazil?", "The capital of Brazil is Brasilia.", "The capital of Brazil is Rio de Janeiro."),
    ("What is the capital of India?", "The capital of India is New Delhi.", "The capital of India is Mumbai."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest.", "The Atlantic Ocean is the largest."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth.", "Sirius is the closest star to Earth."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "Venus is known as the Red Planet."),
    ("What is the hottest planet in our solar system?", "Venus is the hottest planet.", "Mercury is the hottest planet."),
    ("How many planets are in our solar system?", "There are 8 planets.", "There are 10 planets."),
    ("What is the chemical symbol for water?", "The chemical formula of water is H2O.", "The chemical formula of water is CO2."),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe.", "The chemical symbol for iron is Ir."),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe.", "Humans need helium to breathe."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius.",
     "Water freezes at 10 degrees Celsius."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain.",
     "Mont Blanc is the tallest mountain."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa.",
     "The Congo is the longest river in Africa."),
    ("Who wrote 'Hamlet'?", "William Shakespeare wrote 'Hamlet'.", "Charles Dickens wrote 'Hamlet'."),
    ("Who painted 'The Starry Night'?", "Vincent van Gogh painted 'The Starry Night'.",
     "Pablo Picasso painted 'The Starry Night'."),
    ("Who developed the theory of relativity?", "Albert Einstein developed it.", "Isaac Newton developed it."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first.", "Yuri Gagarin was the first."),
    ("What is the opposite of 'hot'?", "The opposite of 'hot' is 'cold'.", "The opposite of 'hot' is 'warm'."),
    ("What is the opposite of 'up'?", "The opposite of 'up' is 'down'.", "The opposite of 'up' is 'left'."),
    ("What is the plural of 'mouse'?", "The plural of 'mouse' is 'mice'.", "The plural of 'mouse' is 'mouses'."),
    ("What is the past tense of 'run'?", "The past tense of 'run' is 'ran'.", "The past tense of 'run' is 'runned'."),
    ("Translate 'hello' into Spanish.", "'Hello' in Spanish is 'hola'.", "'Hello' in Spanish is 'bonjour'."),
    ("Translate 'cat' into French.", "'Cat' in French is 'chat'.", "'Cat' in French is 'gato'."),
    ("Translate 'water' into German.", "'Water' in German is 'Wasser'.", "'Water' in German is 'agua'."),
    ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.",
     "Mixing blue and yellow gives purple."),
    ("What color is a ripe banana?", "A ripe banana is yellow.", "A ripe banana is blue."),
    ("What animal is known as the king of the jungle?", "The lion is known as the king of the jungle.",
     "The zebra is known as the king of the jungle."),
    ("What is the largest mammal?", "The blue whale is the largest mammal.", "The elephant is the largest mammal."),
    ("How many legs does an insect have?", "An insect has 6 legs.", "An insect has 8 legs."),
    ("What do bees make?", "Bees make honey.", "Bees make milk."),
    ("What is the main language spoken in Brazil?", "The main language of Brazil is Portuguese.",
     "The main language of Brazil is Spanish."),
    ("What currency is used in Japan?", "Japan uses the yen.", "Japan uses the euro."),
    ("What does 'www' stand for in a web address?", "'www' stands for World Wide Web.", "'www' stands for Wide Web World."),
    ("What does RAM stand for?", "RAM stands for random-access memory.", "RAM stands for read-all memory."),
    ("Which keyword defines a function in Python?", "Python defines functions with 'def'.",
     "Python defines functions with 'func'."),
    ("What is the binary number 101 in decimal?", "Binary 101 is 5 in decimal.", "Binary 101 is 101 in decimal."),
    ("Which is heavier, a kilogram of iron or a kilogram of feathers?", "They weigh the same: one kilogram each.",
     "A kilogram of iron is heavier."),
    ("What shape has four equal sides and four right angles?", "A square.", "A triangle."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit.",
     "Water freezes at 0 degrees Fahrenheit."),
    ("In which season do leaves fall from trees?", "Leaves fall in autumn.", "Leaves fall in spring."),
)

FILLER = " I hope this helps, and please let me know if you have any other questions about this or anything else."

# (kind, score, evidence); the answer of each kind is built by `_answer`
KINDS: tuple[tuple[str, float, str], ...] = (
    ("correct", 9.0, "Correct and concise."),
    ("wordy", 7.0, "Correct but padded with filler."),
    ("wrong", 3.0, "The answer is wrong."),
    ("off_topic", 2.0, "It does not answer the question."),
    ("cut", 4.0, "Cut off before it gives an answer."),
)


def _answer(kind: str, i: int) -> str:
    question, right, wrong = FACTS[i]
    if kind == "correct":
        return right
    if kind == "wordy":
        return right + FILLER
    if kind == "wrong":
        return wrong
    if kind == "off_topic":
        return FACTS[(i + 7) % len(FACTS)][1]
    words = (right + FILLER).split()
    return " ".join(words[: max(2, len(words) // 4)])


def feedback_records(rubric: str = RUBRIC, answer_format: str = "evidence_first") -> list[dict]:
    """One judge example per (fact, kind): the rubric prompt as the user turn, the verdict as the answer."""
    out = []
    for i, (question, _, _) in enumerate(FACTS):
        for kind, score, evidence in KINDS:
            prompt = render_judge_prompt(rubric, question, _answer(kind, i), answer_format)
            out.append({"id": f"fb-{i:03d}-{kind}", "score": score, "kind": kind, "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": format_judge_answer(evidence, score, answer_format)}]})
    return out


def write_feedback(path: str | Path, rubric: str = RUBRIC, answer_format: str = "evidence_first") -> Path:
    from tso.io import atomic_write_text

    rows = feedback_records(rubric, answer_format)
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    print(write_feedback(sys.argv[1] if len(sys.argv) > 1 else "real-feedback.jsonl"))
