"""Deterministic training text for agentd's built-in tiny language model.

Every sentence is produced here from small word lists and templates, so the corpus is
license-clean, needs no download and is identical on every run for the same seed. Three
kinds of documents, each starting with ``<|bos|>``:

* chat dialogues rendered with :func:`agentd.generate.chat.render_chat` (the assistant turn
  ends with ``<|end|>``): arithmetic, counting, colours, animals, agent decisions, greetings,
  spelling, comparisons, days and months;
* mini-stories (a few sentences about an animal, a place and an event), ending with
  ``<|end|>``;
* plain facts as short paragraphs, ending with ``<|end|>``.

``make_corpus(seed, documents)`` returns the list of documents; ``python
scripts/tinylm_corpus.py --documents 5`` prints a sample.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from agentd.generate.chat import BOS, END, render_chat

__all__ = ["make_corpus"]

NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]

COLOURS = {
    "sky": "blue",
    "grass": "green",
    "sun": "yellow",
    "snow": "white",
    "night": "black",
    "sea": "blue",
    "banana": "yellow",
    "tomato": "red",
    "leaf": "green",
    "carrot": "orange",
    "lemon": "yellow",
    "cherry": "red",
    "coal": "black",
    "milk": "white",
    "orange": "orange",
    "plum": "purple",
    "cloud": "white",
    "strawberry": "red",
    "lime": "green",
    "grape": "purple",
}

# animal: (sound, home, food, size, legs)
ANIMALS = {
    "cat": ("meow", "house", "fish", "small", 4),
    "dog": ("woof", "house", "bones", "medium", 4),
    "cow": ("moo", "farm", "grass", "big", 4),
    "duck": ("quack", "pond", "seeds", "small", 2),
    "sheep": ("baa", "farm", "grass", "medium", 4),
    "horse": ("neigh", "stable", "hay", "big", 4),
    "owl": ("hoot", "tree", "mice", "small", 2),
    "lion": ("roar", "savanna", "meat", "big", 4),
    "frog": ("ribbit", "pond", "flies", "small", 4),
    "pig": ("oink", "farm", "apples", "medium", 4),
    "bee": ("buzz", "hive", "nectar", "tiny", 6),
    "mouse": ("squeak", "field", "cheese", "tiny", 4),
    "hen": ("cluck", "farm", "corn", "small", 2),
    "wolf": ("howl", "forest", "meat", "medium", 4),
    "bird": ("tweet", "nest", "worms", "small", 2),
    "fox": ("yip", "forest", "berries", "medium", 4),
    "bear": ("growl", "forest", "honey", "big", 4),
    "goat": ("bleat", "hill", "leaves", "medium", 4),
}

NAMES = [
    "Ada",
    "Ben",
    "Cleo",
    "Dan",
    "Eva",
    "Finn",
    "Gus",
    "Hana",
    "Ivy",
    "Jon",
    "Kai",
    "Lea",
    "Max",
    "Nia",
    "Otto",
    "Pia",
    "Quin",
    "Rosa",
    "Sam",
    "Tia",
    "Uma",
    "Vic",
    "Wren",
    "Yara",
    "Zoe",
]

PLACES = (
    "forest",
    "village",
    "garden",
    "river",
    "hill",
    "farm",
    "city",
    "beach",
    "meadow",
    "mountain",
    "lake",
    "park",
)

OBJECTS = ("ball", "box", "key", "map", "hat", "book", "kite", "cup", "stone", "lamp", "rope")
ADJECTIVES = ("little", "brave", "happy", "sleepy", "clever", "kind", "curious", "quiet", "tiny")
WEATHER = ("sunny", "rainy", "windy", "cold", "warm", "cloudy", "foggy", "snowy")
FEELINGS = ("happy", "tired", "excited", "calm", "proud", "hungry", "sleepy")
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer in one short sentence.",
    "You are an agent. Decide what to do next.",
    "You are a tiny model inside agentd.",
    "Answer briefly.",
)

# Agent decisions: (situation, action, reason)
DECISIONS = (
    ("energy is low", "rest", "you need to recover energy"),
    ("energy is low and it is night", "rest", "it is dark and you are tired"),
    ("a threat is near", "retreat", "it is not safe here"),
    ("a threat is near and health is low", "retreat", "your health is low"),
    ("health is low", "retreat", "you should heal first"),
    ("resources are nearby", "gather", "there is something useful close by"),
    ("resources are nearby and the bag is empty", "gather", "there is room in your bag"),
    ("the bag is full", "return home", "you cannot carry more"),
    ("the map is unexplored", "explore", "there is a lot to discover"),
    ("the goal is far away", "explore", "you must move closer to the goal"),
    ("the goal is close", "move to the goal", "you are almost there"),
    ("an ally needs help", "help the ally", "friends help each other"),
    ("nothing is happening", "wait", "there is no reason to move"),
    ("the cooldown is not over", "wait", "your last action is still recharging"),
    ("a storm is coming", "find shelter", "the weather will be bad"),
    ("a task is finished", "report", "the team should know"),
    ("a message arrived", "read the message", "it may be important"),
    ("the door is locked and you have the key", "open the door", "you have the key"),
)

TOOLS = (
    ("add two numbers", "the calculator tool"),
    ("find the weather", "the weather tool"),
    ("search for a word", "the search tool"),
    ("read a file", "the file tool"),
    ("send a message", "the message tool"),
    ("count words", "the counter tool"),
)

GREETINGS = (
    ("hello", "Hello! How can I help you today?"),
    ("hi", "Hi! What can I do for you?"),
    ("hello there", "Hello! How can I help you today?"),
    ("good morning", "Good morning! How can I help you?"),
    ("good evening", "Good evening! How can I help you?"),
    ("hey", "Hey! What can I do for you?"),
    ("how are you?", "I am fine, thank you. How can I help you?"),
    ("who are you?", "I am a tiny language model that runs inside agentd."),
    ("what is your name?", "My name is tinylm. I am a tiny language model."),
    ("what can you do?", "I can do simple arithmetic, count, and answer easy questions."),
    ("thank you", "You are welcome!"),
    ("thanks", "You are welcome!"),
    ("bye", "Goodbye! Have a nice day."),
    ("goodbye", "Goodbye! Have a nice day."),
    ("tell me a joke", "Why did the cat sit on the computer? To keep an eye on the mouse."),
    ("are you an agent?", "I am a small model that agents use to write text."),
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _maybe_question(rng: random.Random, text: str) -> str:
    return text + rng.choice(("?", "?", "", "?"))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _number(rng: random.Random, n: int) -> str:
    """Digits mostly; sometimes the word, so the model links the two."""
    if n <= 20 and rng.random() < 0.15:
        return NUMBER_WORDS[n]
    return str(n)


# ---- chat topics: each returns a list of (user, assistant) turns --------------------------


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    # Mostly small operands: a model this size can learn the tables it sees often.
    op = rng.choice(("plus", "plus", "plus", "minus", "minus", "times"))
    top = 20 if rng.random() < 0.85 else 50
    if op == "plus":
        a, b = rng.randint(0, top), rng.randint(0, top)
        result = a + b
    elif op == "minus":
        a = rng.randint(0, top)
        b = rng.randint(0, a)
        result = a - b
    else:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        result = a * b
    symbol = {"plus": "+", "minus": "-", "times": "*"}[op]
    style = rng.randrange(5)
    if style == 0:
        question = f"what is {a} {op} {b}"
    elif style == 1:
        question = f"What is {a} {symbol} {b}"
    elif style == 2:
        question = f"{a} {symbol} {b} ="
        return question, f"{a} {symbol} {b} = {result}."
    elif style == 3:
        question = f"how much is {a} {op} {b}"
    else:
        question = f"Compute {a} {op} {b}."
        return question, f"{a} {op} {b} is {result}."
    return _maybe_question(rng, question), f"{a} {op} {b} is {result}."


def _counting(rng: random.Random) -> tuple[str, str]:
    style = rng.randrange(4)
    if style == 0:
        start = rng.randint(0, 20)
        end = start + rng.randint(2, 6)
        numbers = ", ".join(str(n) for n in range(start, end + 1))
        return f"count from {start} to {end}", f"{numbers}."
    if style == 1:
        end = rng.randint(3, 10)
        words = ", ".join(NUMBER_WORDS[1 : end + 1])
        return f"count to {NUMBER_WORDS[end]} in words", f"{_cap(words)}."
    if style == 2:
        n = rng.randint(0, 98)
        return _maybe_question(rng, f"what comes after {n}"), f"{n + 1} comes after {n}."
    n = rng.randint(1, 99)
    return _maybe_question(rng, f"what comes before {n}"), f"{n - 1} comes before {n}."


def _compare(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(0, 100), 2)
    if rng.random() < 0.5:
        return _maybe_question(rng, f"which is bigger, {a} or {b}"), f"{max(a, b)} is bigger."
    return _maybe_question(rng, f"which is smaller, {a} or {b}"), f"{min(a, b)} is smaller."


def _colour(rng: random.Random) -> tuple[str, str]:
    thing, colour = rng.choice(list(COLOURS.items()))
    the = "" if thing in ("snow", "grass", "milk", "coal") else "the "
    if thing in (
        "banana",
        "tomato",
        "leaf",
        "carrot",
        "lemon",
        "cherry",
        "orange",
        "plum",
        "cloud",
        "strawberry",
        "lime",
        "grape",
    ):
        the = _article(thing) + " "
    style = rng.randrange(3)
    if style == 0:
        return _maybe_question(
            rng, f"what colour is {the}{thing}"
        ), f"{_cap(the)}{thing} is {colour}."
    if style == 1:
        return _maybe_question(
            rng, f"What color is {the}{thing}"
        ), f"{_cap(the)}{thing} is {colour}."
    others = [c for c in sorted(set(COLOURS.values())) if c != colour]
    wrong = rng.choice(others)
    return (
        _maybe_question(rng, f"is {the}{thing} {wrong}"),
        f"No, {the}{thing} is {colour}.",
    )


def _animal(rng: random.Random) -> tuple[str, str]:
    animal, (sound, home, food, size, legs) = rng.choice(list(ANIMALS.items()))
    a = _article(animal)
    style = rng.randrange(6)
    if style == 0:
        return (
            _maybe_question(rng, f"what sound does {a} {animal} make"),
            f"{_cap(a)} {animal} says {sound}.",
        )
    if style == 1:
        return _maybe_question(
            rng, f"where does {a} {animal} live"
        ), f"{_cap(a)} {animal} lives in a {home}."
    if style == 2:
        return _maybe_question(
            rng, f"what does {a} {animal} eat"
        ), f"{_cap(a)} {animal} eats {food}."
    if style == 3:
        return (
            _maybe_question(rng, f"how many legs does {a} {animal} have"),
            f"{_cap(a)} {animal} has {legs} legs.",
        )
    if style == 4:
        return _maybe_question(
            rng, f"is {a} {animal} big or small"
        ), f"{_cap(a)} {animal} is {size}."
    return f"tell me about the {animal}", (
        f"The {animal} is a {size} animal. It lives in a {home}, eats {food} and says {sound}."
    )


def _decision(rng: random.Random) -> tuple[str, str]:
    situation, action, reason = rng.choice(DECISIONS)
    style = rng.randrange(3)
    if style == 0:
        return f"{_cap(situation)}. What should I do?", f"You should {action}, because {reason}."
    if style == 1:
        return f"situation: {situation}. next action?", f"Action: {action}."
    return f"{_cap(situation)}. Should I {action}?", f"Yes, {action}. {_cap(reason)}."


def _tool(rng: random.Random) -> tuple[str, str]:
    task, tool = rng.choice(TOOLS)
    return f"Which tool should I use to {task}?", f"Use {tool} to {task}."


def _greeting(rng: random.Random) -> tuple[str, str]:
    user, reply = rng.choice(GREETINGS)
    if rng.random() < 0.3:
        user = _cap(user)
    return user, reply


def _spelling(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(list(ANIMALS) + list(COLOURS.values()) + list(OBJECTS))
    if rng.random() < 0.5:
        return f"spell {word}", f"{'-'.join(word.upper())}."
    return f"how many letters are in {word}?", f"{_cap(word)} has {len(word)} letters."


def _calendar(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        i = rng.randrange(7)
        return (
            _maybe_question(rng, f"what day comes after {DAYS[i]}"),
            f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}.",
        )
    i = rng.randrange(12)
    return (
        _maybe_question(rng, f"what month comes after {MONTHS[i]}"),
        f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}.",
    )


def _story_request(rng: random.Random) -> tuple[str, str]:
    animal = rng.choice(list(ANIMALS))
    return f"tell me a story about a {animal}", _story(rng, animal)


CHAT_TOPICS: tuple[tuple[Callable[[random.Random], tuple[str, str]], int], ...] = (
    (_arithmetic, 9),
    (_counting, 4),
    (_compare, 1),
    (_colour, 2),
    (_animal, 3),
    (_decision, 3),
    (_tool, 1),
    (_greeting, 2),
    (_spelling, 1),
    (_calendar, 1),
    (_story_request, 1),
)


# ---- stories and facts -----------------------------------------------------------------


def _story(rng: random.Random, animal: str | None = None) -> str:
    animal = animal or rng.choice(list(ANIMALS))
    sound, home, food, _size, _legs = ANIMALS[animal]
    adjective = rng.choice(ADJECTIVES)
    name = rng.choice(NAMES)
    place = rng.choice(PLACES)
    thing = rng.choice(OBJECTS)
    colour = rng.choice(sorted(set(COLOURS.values())))
    weather = rng.choice(WEATHER)
    feeling = rng.choice(FEELINGS)
    friend = rng.choice([a for a in ANIMALS if a != animal])
    opening = rng.choice(
        (
            f"Once upon a time, there was a {adjective} {animal} named {name}.",
            f"{name} was a {adjective} {animal} who lived near the {place}.",
            f"One {weather} day, a {adjective} {animal} called {name} went to the {place}.",
        )
    )
    middle = rng.choice(
        (
            f"{name} found a {colour} {thing} under a tree.",
            f"{name} met a {friend} by the {place}.",
            f"{name} was looking for {food}.",
            f"{name} lost a {colour} {thing} near the {place}.",
        )
    )
    event = rng.choice(
        (
            f"The {friend} said hello, and {name} said {sound}.",
            f"{name} carried the {thing} back to the {home}.",
            "They played together until the sun went down.",
            f"It started to rain, so they hid in the {home}.",
            f"{name} shared some {food} with the {friend}.",
        )
    )
    ending = rng.choice(
        (
            f"At the end of the day, {name} felt {feeling}.",
            f"{name} went home and slept well.",
            f"From then on, {name} and the {friend} were friends.",
            "The end.",
        )
    )
    return " ".join((opening, middle, event, ending))


def _facts(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.randrange(5)
        if kind == 0:
            thing, colour = rng.choice(list(COLOURS.items()))
            sentences.append(f"The {thing} is {colour}.")
        elif kind == 1:
            animal, (sound, home, food, _size, legs) = rng.choice(list(ANIMALS.items()))
            sentences.append(
                rng.choice(
                    (
                        f"{_cap(_article(animal))} {animal} says {sound}.",
                        f"{_cap(_article(animal))} {animal} lives in a {home}.",
                        f"{_cap(_article(animal))} {animal} eats {food}.",
                        f"{_cap(_article(animal))} {animal} has {legs} legs.",
                    )
                )
            )
        elif kind == 2:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            sentences.append(f"{a} plus {b} is {a + b}.")
        elif kind == 3:
            i = rng.randrange(7)
            sentences.append(f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}.")
        else:
            situation, action, _reason = rng.choice(DECISIONS)
            sentences.append(f"When {situation}, an agent should {action}.")
    return " ".join(sentences)


def _chat(rng: random.Random) -> str:
    topics, weights = zip(*CHAT_TOPICS, strict=True)
    messages: list[dict[str, str]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        topic = rng.choices(topics, weights)[0]
        user, assistant = topic(rng)
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return render_chat(messages, add_generation_prompt=False)


def make_document(rng: random.Random) -> str:
    """One training document: ``<|bos|>`` ... ending with ``<|end|>`` (plus a newline for
    chats, exactly as the chat template writes it)."""
    kind = rng.random()
    if kind < 0.7:
        return _chat(rng)
    if kind < 0.85:
        return f"{BOS}{_story(rng)}{END}"
    return f"{BOS}{_facts(rng)}{END}"


def make_corpus(seed: int, documents: int) -> list[str]:
    rng = random.Random(seed)
    return [make_document(rng) for _ in range(documents)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--documents", type=int, default=8)
    args = parser.parse_args()
    for document in make_corpus(args.seed, args.documents):
        print(document)
        print("-" * 40)


if __name__ == "__main__":
    main()
