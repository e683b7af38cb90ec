"""The default models' classes: which emoji each class holds, and which are left out, in one place.

Each class is chosen for one shared look (a small model learns a class whose members look
alike; a Unicode subgroup such as "mammal" mixes zebras and otters and came out as blobs).
Names are Unicode CLDR short names as ``emoji-test.txt`` writes them, without skin tones: every
single-tone variant of a chosen emoji is taken too. ``flip`` says whether a mirrored copy is
still a member of the class (a mirrored clock face or keycap is not).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmojiClass:
    name: str
    subgroups: tuple[str, ...] = ()  # every emoji of these Unicode subgroups ...
    names: tuple[str, ...] = ()  # ... and these by name (from any subgroup)
    name_contains: tuple[tuple[str, str], ...] = ()  # (subgroup, word): names in the subgroup containing the word
    exclude: tuple[str, ...] = ()  # ... less these
    flip: bool = True


FACE_SUBGROUPS = (
    "face-smiling", "face-affection", "face-tongue", "face-hand", "face-neutral-skeptical", "face-sleepy",
    "face-unwell", "face-hat", "face-glasses", "face-concerned", "face-negative",
)

CLASSES: tuple[EmojiClass, ...] = (
    EmojiClass(
        "smiley face", subgroups=FACE_SUBGROUPS,
        exclude=("skull", "skull and crossbones", "smiling face with horns", "angry face with horns",
                 "face in clouds", "dotted line face", "face with steam from nose"),
    ),
    EmojiClass("heart", subgroups=("heart",), exclude=("heart decoration", "love letter")),
    EmojiClass("flag", subgroups=("country-flag", "subdivision-flag"), flip=False),
    EmojiClass(
        "clock", name_contains=(("time", "o’clock"), ("time", "-thirty")),
        names=("alarm clock", "mantelpiece clock", "timer clock", "stopwatch"), flip=False,
    ),
    EmojiClass(
        "hand",
        subgroups=("hand-fingers-open", "hand-fingers-partial", "hand-single-finger", "hand-fingers-closed", "hands"),
    ),
    EmojiClass("person", subgroups=("person-gesture", "person-role")),
    EmojiClass(
        "animal face", subgroups=("cat-face", "monkey-face"),
        names=("monkey face", "dog face", "wolf", "fox", "raccoon", "cat face", "lion", "tiger face", "horse face",
               "unicorn", "cow face", "pig face", "mouse face", "hamster", "rabbit face", "bear", "polar bear",
               "koala", "panda", "frog", "dragon face", "moose", "donkey"),
    ),
    EmojiClass("moon", name_contains=(("sky & weather", "moon"),)),
    EmojiClass(
        "shape", subgroups=("geometric",),
        exclude=("radio button", "white square button", "black square button", "diamond with a dot",
                 # white on the white background: nothing but an outline is left
                 "white circle", "white large square", "white medium square", "white medium-small square",
                 "white small square"),
        flip=False,
    ),
    EmojiClass("sign tile", subgroups=("keycap", "zodiac", "av-symbol"), flip=False),
    EmojiClass(
        "car",
        names=("automobile", "taxi", "police car", "sport utility vehicle", "racing car", "bus", "minibus",
               "trolleybus", "ambulance", "fire engine", "pickup truck", "delivery truck", "articulated lorry",
               "tractor"),
    ),
    EmojiClass("fruit", subgroups=("food-fruit",)),
)

CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
