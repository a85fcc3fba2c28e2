"""Per-language tables for :mod:`toolkit.synth`: espeak-ng voices, vocabulary, templates, sentence builders.

Each :class:`Language` in :data:`LANGUAGES` says how to make and speak one language's sentences:
which espeak-ng voices and variants to draw from, a function that builds one random sentence from
the language's word lists and templates, and a tag that goes into every seed string (empty for
English, so its corpora stay exactly what they were before other languages existed).

Only espeak-ng's own voices are listed; the mbrola ones (``mb-...``) need the separate mbrola package.
A variant adds timbre: ``m*`` male, ``f*`` female formants.

English sentences are made of fixed word lists. French ones also carry gender: every noun has one,
determiners, adjectives, states and feelings agree with it, past participles after *être* take an
``e`` for a feminine subject, and a last pass applies elision and contraction (``le élève`` ->
``l'élève``, ``ma enveloppe`` -> ``mon enveloppe``, ``que Inès`` -> ``qu'Inès``, ``à le`` -> ``au``).
This module imports nothing heavy, so the command line can read the language codes from it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    """How to synthesise one language: voices to draw from and a sentence generator."""

    code: str
    name: str
    voices: tuple[str, ...]
    variants: tuple[str, ...]
    sentence: Callable[[random.Random], str]
    seed_tag: str  # goes into every seed string; "" for English keeps its original seeds


# --- English -----------------------------------------------------------------------------------------
# espeak-ng's own English voices (Debian's espeak-ng-data 1.51).
EN_VOICES = (
    "en-us",
    "en-gb",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4")

EN_NAMES = (
    "Anna", "Peter", "Maria", "James", "Sofia", "David", "Laura", "Thomas", "Emma", "Daniel",
    "Olivia", "Samuel", "Grace", "Henry", "Lucy", "Oliver", "Hannah", "Jack", "Alice", "Robert",
)
EN_PEOPLE = (
    "teacher", "doctor", "farmer", "driver", "baker", "student", "neighbour", "manager", "pilot", "nurse",
    "painter", "gardener", "singer", "writer", "engineer", "captain", "librarian", "old man", "young woman",
    "little boy",
)
EN_ADJECTIVES = (
    "small", "big", "red", "green", "blue", "heavy", "quiet", "warm", "cold", "new", "broken", "wooden",
    "bright", "dusty", "strange", "lovely", "tiny", "yellow", "clean", "empty", "shiny", "soft", "old",
    "useful", "expensive", "simple",
)
EN_THINGS = (
    "box", "letter", "bicycle", "kettle", "window", "book", "basket", "lamp", "chair", "map", "ticket",
    "jacket", "bottle", "garden", "picture", "clock", "umbrella", "blanket", "radio", "camera", "table",
    "bucket", "ladder", "envelope", "notebook", "candle", "guitar", "bridge", "boat", "key",
)
EN_PAST_VERBS = (
    ("found", "find"), ("carried", "carry"), ("painted", "paint"), ("opened", "open"), ("cleaned", "clean"),
    ("bought", "buy"), ("sold", "sell"), ("fixed", "fix"), ("moved", "move"), ("washed", "wash"),
    ("borrowed", "borrow"), ("dropped", "drop"), ("lost", "lose"), ("brought", "bring"), ("checked", "check"),
    ("hid", "hide"), ("built", "build"), ("wrapped", "wrap"), ("returned", "return"), ("noticed", "notice"),
)
EN_PLACES = (
    "in the kitchen", "near the river", "at the station", "behind the house", "in the garden",
    "on the bus", "at the market", "under the bridge", "in the library", "by the window",
    "at the office", "on the beach", "in the village", "at the harbour", "in the park",
    "next to the school", "on the top shelf", "in the hallway",
)
EN_PAST_TIMES = (
    "yesterday", "last night", "this morning", "on Monday", "after lunch", "last summer",
    "a week ago", "before dinner", "early on Sunday", "late in the evening",
)
EN_FUTURE_TIMES = (
    "tomorrow", "next week", "on Friday", "after the meeting", "before the holidays", "tonight",
    "in the spring", "later this afternoon",
)
EN_STATES = ("warm", "wet", "open", "locked", "dirty", "missing", "cold", "full", "empty", "on the floor")
EN_FEELINGS = ("happy", "surprised", "tired", "worried", "proud", "calm", "excited", "nervous")
EN_WEATHER = (
    "it was raining", "the sun was shining", "the wind was strong", "it started to snow",
    "the sky was grey", "the streets were quiet",
)

EN_TEMPLATES = (
    "{subj} {past} {obj} {place}.",
    "{Past_time}, {subj} {past} {obj}.",
    "{subj} {past} {obj} {place} {past_time}.",
    "Did {subj} really {base} {obj} {place}?",
    "{subj} will {base} {obj} {future_time}.",
    "Please {base} {obj} {future_time}.",
    "{subj} said that {subj2} {past} {obj}.",
    "Why did {subj} {base} {obj} {past_time}?",
    "{obj} was still {state} when {subj} came home.",
    "When {weather}, {subj} felt {feeling} and stayed {place}.",
    "{subj} was {feeling} because {subj2} {past} {obj}.",
    "I think {subj} left {obj} {place}.",
    "We asked {subj} to {base} {obj} {future_time}.",
    "Look, {subj} just {past} {obj}!",
    "{subj} never {past} {obj} again.",
)


def _en_article(rng: random.Random, noun_phrase: str) -> str:
    article = rng.choice(("the", "a", "my", "our", "that", "his", "her"))
    if article == "a" and (noun_phrase[0] in "aeio" or noun_phrase.startswith(("um", "un"))):
        article = "an"
    return f"{article} {noun_phrase}"


def _en_subject(rng: random.Random) -> str:
    if rng.random() < 0.45:
        return rng.choice(EN_NAMES)
    return f"{rng.choice(('the', 'my', 'our', 'a'))} {rng.choice(EN_PEOPLE)}"


def _en_object(rng: random.Random) -> str:
    noun = rng.choice(EN_THINGS)
    return _en_article(rng, f"{rng.choice(EN_ADJECTIVES)} {noun}" if rng.random() < 0.7 else noun)


def english_sentence(rng: random.Random) -> str:
    """One English sentence from a random template; capitalised, ending in punctuation."""
    template = rng.choice(EN_TEMPLATES)
    past, base = rng.choice(EN_PAST_VERBS)
    subj = _en_subject(rng)
    subj2 = _en_subject(rng)
    while subj2 == subj:
        subj2 = _en_subject(rng)
    past_time = rng.choice(EN_PAST_TIMES)
    fields = {
        "subj": subj,
        "subj2": subj2,
        "obj": _en_object(rng),
        "past": past,
        "base": base,
        "place": rng.choice(EN_PLACES),
        "past_time": past_time,
        "Past_time": past_time[0].upper() + past_time[1:],
        "future_time": rng.choice(EN_FUTURE_TIMES),
        "state": rng.choice(EN_STATES),
        "feeling": rng.choice(EN_FEELINGS),
        "weather": rng.choice(EN_WEATHER),
    }
    text = template.format(**fields)
    return text[0].upper() + text[1:]



# --- French ------------------------------------------------------------------------------------------
# espeak-ng's own French voices (lang/roa/fr, fr-BE, fr-CH); the Belgian and Swiss ones differ from
# "fr" mainly in number words (septante, nonante) and intonation, so the variants, speeds and pitches
# make most of the variety.
FR_VOICES = ("fr", "fr-be", "fr-ch")

M, F = "m", "f"  # grammatical gender
FR_NAMES = (
    ("Hélène", F), ("Jérôme", M), ("Léa", F), ("Chloé", F), ("François", M), ("Amélie", F), ("Noémie", F),
    ("Zoé", F), ("André", M), ("Émile", M), ("Inès", F), ("Raphaël", M), ("Benoît", M), ("Gaëlle", F),
    ("Thérèse", F), ("Marc", M), ("Julie", F), ("Louis", M), ("Sébastien", M), ("Océane", F),
)
FR_PEOPLE = (
    ("professeur", M), ("médecin", M), ("fermière", F), ("chauffeur", M), ("boulangère", F), ("élève", M),
    ("étudiante", F), ("voisin", M), ("voisine", F), ("directrice", F), ("pilote", M), ("infirmière", F),
    ("peintre", M), ("jardinier", M), ("chanteuse", F), ("écrivain", M), ("ingénieure", F), ("capitaine", M),
    ("bibliothécaire", F), ("facteur", M), ("jeune femme", F), ("petit garçon", M), ("cuisinier", M),
    ("serveuse", F),
)
# (masculine, feminine); all of them follow the noun.
FR_ADJECTIVES = (
    ("rouge", "rouge"), ("vert", "verte"), ("bleu", "bleue"), ("lourd", "lourde"), ("neuf", "neuve"),
    ("cassé", "cassée"), ("propre", "propre"), ("brillant", "brillante"), ("étrange", "étrange"),
    ("jaune", "jaune"), ("léger", "légère"), ("énorme", "énorme"), ("fragile", "fragile"),
    ("mouillé", "mouillée"), ("poussiéreux", "poussiéreuse"), ("doré", "dorée"), ("blanc", "blanche"),
    ("noir", "noire"), ("abîmé", "abîmée"), ("minuscule", "minuscule"), ("gris", "grise"),
    ("ancien", "ancienne"), ("vide", "vide"), ("pratique", "pratique"), ("coûteux", "coûteuse"),
    ("simple", "simple"),
)
FR_THINGS = (
    ("livre", M), ("lettre", F), ("vélo", M), ("bouilloire", F), ("fenêtre", F), ("panier", M), ("lampe", F),
    ("chaise", F), ("carte", F), ("billet", M), ("veste", F), ("bouteille", F), ("tableau", M), ("horloge", F),
    ("parapluie", M), ("couverture", F), ("radio", F), ("appareil photo", M), ("table", F), ("seau", M),
    ("échelle", F), ("enveloppe", F), ("cahier", M), ("bougie", F), ("guitare", F), ("clé", F), ("bateau", M),
    ("valise", F), ("écharpe", F), ("miroir", M), ("gâteau", M), ("théière", F),
)
FR_DETERMINERS = {
    "le": ("le", "la"), "un": ("un", "une"), "mon": ("mon", "ma"), "notre": ("notre", "notre"),
    "ce": ("ce", "cette"), "son": ("son", "sa"),
}
FR_SUBJECT_DETERMINERS = ("le", "mon", "notre", "un")
FR_OBJECT_DETERMINERS = ("le", "un", "mon", "notre", "ce", "son")
# (past participle with avoir, infinitive)
FR_VERBS = (
    ("trouvé", "trouver"), ("porté", "porter"), ("peint", "peindre"), ("ouvert", "ouvrir"),
    ("nettoyé", "nettoyer"), ("acheté", "acheter"), ("vendu", "vendre"), ("réparé", "réparer"),
    ("déplacé", "déplacer"), ("lavé", "laver"), ("emprunté", "emprunter"), ("laissé tomber", "laisser tomber"),
    ("perdu", "perdre"), ("apporté", "apporter"), ("vérifié", "vérifier"), ("caché", "cacher"),
    ("emballé", "emballer"), ("rendu", "rendre"), ("remarqué", "remarquer"), ("oublié", "oublier"),
)
FR_PLACES = (
    "dans la cuisine", "près de la rivière", "à la gare", "derrière la maison", "dans le jardin",
    "dans le bus", "au marché", "sous le pont", "à la bibliothèque", "près de la fenêtre", "au bureau",
    "sur la plage", "au village", "au port", "dans le parc", "à côté de l'école", "sur l'étagère du haut",
    "dans le couloir", "au café", "près de l'église",
)
FR_PAST_TIMES = (
    "hier", "hier soir", "ce matin", "lundi", "après le déjeuner", "l'été dernier", "il y a une semaine",
    "avant le dîner", "tôt dimanche matin", "tard dans la soirée",
)
FR_FUTURE_TIMES = (
    "demain", "la semaine prochaine", "vendredi", "après la réunion", "avant les vacances", "ce soir",
    "au printemps", "plus tard cet après-midi",
)
FR_STATES = (
    ("chaud", "chaude"), ("mouillé", "mouillée"), ("ouvert", "ouverte"), ("fermé à clé", "fermée à clé"),
    ("sale", "sale"), ("froid", "froide"), ("plein", "pleine"), ("vide", "vide"), ("allumé", "allumée"),
    ("par terre", "par terre"),
)
FR_FEELINGS = (
    ("heureux", "heureuse"), ("surpris", "surprise"), ("fatigué", "fatiguée"), ("inquiet", "inquiète"),
    ("fier", "fière"), ("calme", "calme"), ("ravi", "ravie"), ("nerveux", "nerveuse"), ("content", "contente"),
    ("étonné", "étonnée"),
)
FR_WEATHER = (
    "il pleuvait", "le soleil brillait", "le vent soufflait fort", "il commençait à neiger",
    "le ciel était gris", "les rues étaient calmes",
)
# {e}: the feminine ending of a participle after être; {pron}: il/elle for the subject.
FR_TEMPLATES = (
    "{subj} a {past} {obj} {place}.",
    "{Past_time}, {subj} a {past} {obj}.",
    "{subj} a {past} {obj} {place} {past_time}.",
    "Est-ce que {subj} a vraiment {past} {obj} {place} ?",
    "{subj} va {base} {obj} {future_time}.",
    "Il faut {base} {obj} {future_time}.",
    "{subj} a dit que {subj2} avait {past} {obj}.",
    "Pourquoi {subj} a-t-{pron} {past} {obj} {past_time} ?",
    "{obj} était encore {state} quand {subj} est rentré{e} à la maison.",
    "Comme {weather}, {subj} est resté{e} {place}.",
    "{subj} était {feeling} parce que {subj2} avait {past} {obj}.",
    "Je pense que {subj} a laissé {obj} {place}.",
    "Nous avons demandé à {subj} de {base} {obj} {future_time}.",
    "Regarde, {subj} vient de {base} {obj} !",
    "{subj} n'a plus jamais {past} {obj}.",
)
_FR_VOWEL = "(?=[aeiouàâäéèêëîïôöûùüœh])"  # words here that start with h all take elision (no h aspiré)
# Elision first (le élève -> l'élève), then contraction of what is left (à le médecin -> au médecin).
FR_ELISIONS = tuple(
    (re.compile(pattern, re.IGNORECASE), replacement)
    for pattern, replacement in (
        (rf"\b(l)[ea] {_FR_VOWEL}", r"\1'"),
        (rf"\b([djn])e {_FR_VOWEL}", r"\1'"),
        (rf"\b(qu)e {_FR_VOWEL}", r"\1'"),
        (rf"\b([mts])a {_FR_VOWEL}", r"\1on "),
        (rf"\b(c)e {_FR_VOWEL}", r"\1et "),
        (r"\bà le ", "au "),
        (r"\bà les ", "aux "),
        (r"\b(d)e le ", r"\1u "),
        (r"\b(d)e les ", r"\1es "),
    )
)


def _agree(forms: tuple[str, str], gender: str) -> str:
    """The masculine or feminine one of ``(masculine, feminine)``."""
    return forms[gender == F]


def _fr_subject(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.45:
        return rng.choice(FR_NAMES)
    noun, gender = rng.choice(FR_PEOPLE)
    return f"{_agree(FR_DETERMINERS[rng.choice(FR_SUBJECT_DETERMINERS)], gender)} {noun}", gender


def _fr_object(rng: random.Random) -> tuple[str, str]:
    noun, gender = rng.choice(FR_THINGS)
    if rng.random() < 0.7:
        noun = f"{noun} {_agree(rng.choice(FR_ADJECTIVES), gender)}"
    return f"{_agree(FR_DETERMINERS[rng.choice(FR_OBJECT_DETERMINERS)], gender)} {noun}", gender


def french_elide(text: str) -> str:
    """Apply French elision and contraction to text built from full word forms."""
    for pattern, replacement in FR_ELISIONS:
        text = pattern.sub(replacement, text)
    return text


def french_sentence(rng: random.Random) -> str:
    """One French sentence from a random template, with agreement and elision; capitalised, punctuated."""
    template = rng.choice(FR_TEMPLATES)
    past, base = rng.choice(FR_VERBS)
    subj, gender = _fr_subject(rng)
    subj2, _ = _fr_subject(rng)
    while subj2 == subj:
        subj2, _ = _fr_subject(rng)
    obj, obj_gender = _fr_object(rng)
    past_time = rng.choice(FR_PAST_TIMES)
    fields = {
        "subj": subj,
        "subj2": subj2,
        "obj": obj,
        "past": past,
        "base": base,
        "place": rng.choice(FR_PLACES),
        "past_time": past_time,
        "Past_time": past_time[0].upper() + past_time[1:],
        "future_time": rng.choice(FR_FUTURE_TIMES),
        "state": _agree(rng.choice(FR_STATES), obj_gender),
        "feeling": _agree(rng.choice(FR_FEELINGS), gender),
        "weather": rng.choice(FR_WEATHER),
        "e": _agree(("", "e"), gender),
        "pron": _agree(("il", "elle"), gender),
    }
    text = french_elide(template.format(**fields))
    return text[0].upper() + text[1:]


LANGUAGES: dict[str, Language] = {
    "en": Language("en", "English", EN_VOICES, VARIANTS, english_sentence, seed_tag=""),
    "fr": Language("fr", "French", FR_VOICES, VARIANTS, french_sentence, seed_tag="fr:"),
}
"""Every language :mod:`toolkit.synth` can speak, by Whisper language code."""
