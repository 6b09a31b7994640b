"""A tiny English-like language for the offline demo, and the pretraining text that teaches it.

The demo has to show a *real* fine-tune on a laptop CPU: a base model that already knows its language
(words, grammar, facts) learns a new instruction format in a couple of minutes. Real English needs a real
model, so the base is pretrained on this small synthetic language instead. Its lexicon is real English:
~630 nouns in 11 categories (with regular and irregular plurals), opposite adjective pairs, colours and
verbs with their past tenses. The running text states that knowledge in many forms ("one mouse, two
mice.", "a mouse is an animal.", "the opposite of hot is cold.", "yesterday the cook ate a pear.") but
never in an instruction/response format, so the demo task asks for knowledge the base has in a form it
has never seen.

Everything is drawn from a seeded `random.Random` and iterates over tuples only, so the same seed gives
the same corpus on every machine and Python version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_SEED = 1234

# Nouns by category. "word" takes the regular plural (`regular_plural`), "word/plural" spells it out.
# Words are chosen so that no form means two things (no "saw" the tool next to "saw" the verb).
_NOUNS = {
    "animal": """cat dog fox wolf/wolves bear lion tiger horse cow pig sheep/sheep goat mouse/mice rat
        rabbit deer/deer moose/moose duck goose/geese hen chicken owl eagle hawk crow sparrow parrot pigeon
        swan frog toad snake lizard turtle whale dolphin shark fish/fish crab lobster octopus squid/squid bee
        ant spider beetle moth butterfly worm snail camel zebra giraffe elephant monkey ape gorilla donkey
        mule ox/oxen bull calf/calves lamb puppy kitten pony bat seal otter beaver badger squirrel hedgehog
        mole hare kangaroo koala panda leopard cheetah hippo rhino buffalo/buffaloes bison/bison
        salmon/salmon trout/trout jellyfish/jellyfish penguin ostrich turkey peacock flamingo llama yak
        lynx raccoon skunk walrus seagull robin wren louse/lice""",
    "food": """apple banana orange pear plum peach cherry grape lemon lime melon mango/mangoes berry
        strawberry potato/potatoes tomato/tomatoes carrot onion bean pea cookie cake pie loaf/loaves bun
        muffin biscuit cracker sandwich burger pizza noodle dumpling pancake waffle egg sausage pickle olive
        radish turnip cabbage pumpkin squash cucumber pepper beet date fig kiwi apricot coconut almond
        walnut peanut pretzel bagel donut cupcake candy tart omelet taco burrito lollipop raisin meatball
        croissant scone pastry avocado""",
    "tool": """hammer drill wrench screwdriver chisel axe knife/knives shovel spade rake hoe ladder needle
        brush broom mop bucket ladle whisk funnel clamp ruler pencil pen crayon eraser stapler magnet lever
        pulley wedge screw bolt hatchet pickaxe sickle scythe trowel mallet anvil crowbar torch flashlight
        lantern key padlock hook chain net pin grater peeler corkscrew sponge spanner compass hose sieve
        scraper paintbrush thimble""",
    "clothing": """shirt coat hat cap scarf/scarves glove sock shoe boot sandal skirt dress jacket
        sweater vest belt mitten apron cloak gown robe blouse tunic hood bonnet beret turban sweatshirt
        hoodie slipper sneaker suit jumper cardigan overcoat raincoat poncho kimono shawl veil collar
        swimsuit headband bandana bib tuxedo corset blazer parka necktie bowtie sari kilt wristband cape
        stocking toga waistcoat leotard nightgown bathrobe tracksuit""",
    "vehicle": """car bus truck van bike bicycle train tram boat ship canoe kayak yacht raft ferry plane
        jet helicopter rocket sled wagon cart carriage taxi tractor scooter motorbike motorcycle submarine
        ambulance limousine trolley tricycle jeep lorry minivan barge glider airship spaceship bulldozer
        forklift snowmobile caravan cab""",
    "plant": """tree bush flower rose tulip daisy lily oak pine elm maple willow birch cedar palm fern weed
        vine cactus/cacti shrub herb sunflower orchid poppy violet lotus clover thistle dandelion mushroom
        fungus/fungi sapling seedling bulb bud reed hedge poplar spruce holly marigold lilac daffodil
        magnolia""",
    "furniture": """chair table bed sofa couch desk shelf/shelves bench stool cabinet cupboard dresser
        wardrobe lamp rug carpet mirror clock cushion pillow curtain drawer crib cot armchair bookcase
        footstool hammock cradle throne sideboard chest mattress recliner ottoman highchair futon""",
    "person": """man/men woman/women child/children person/people baby boy girl king queen prince princess
        farmer baker teacher doctor nurse pilot sailor soldier driver cook chef judge singer dancer painter
        writer poet actor hero/heroes thief/thieves wife/wives knight guard monk nun priest tailor miner
        hunter fisherman/fishermen postman/postmen clerk lawyer dentist student friend neighbor stranger
        giant elf/elves witch wizard mother father sister brother aunt uncle cousin grandmother
        grandfather husband nephew niece butcher carpenter plumber shepherd merchant captain servant maid
        pirate""",
    "body": """foot/feet tooth/teeth hand arm leg head eye ear nose mouth finger thumb toe knee elbow
        shoulder neck chin cheek lip tongue heart lung brain bone skull rib hip wrist ankle heel belly tail
        wing beak paw claw hoof/hooves feather fin whisker""",
    "place": """house school church castle tower bridge barn farm shop store market park garden city town
        village road street river lake ocean mountain hill valley forest island beach desert cave palace
        hut tent cabin temple museum library hospital factory office station airport harbor zoo bakery
        kitchen hall cottage mill fountain stadium pond meadow cathedral prison theater hotel restaurant
        cinema playground tunnel lighthouse swamp""",
    "instrument": """drum flute guitar piano violin harp trumpet bell banjo cello tuba fiddle whistle cymbal
        gong harmonica bugle lute trombone oboe clarinet saxophone xylophone tambourine accordion sitar
        mandolin horn bagpipe""",
}

# How running text names each category: "a mouse is an animal." / "mice are animals."
CATEGORY_SINGULAR = {
    "animal": "an animal",
    "food": "a kind of food",
    "tool": "a tool",
    "clothing": "a kind of clothing",
    "vehicle": "a vehicle",
    "plant": "a plant",
    "furniture": "a piece of furniture",
    "person": "a person",
    "body": "a part of the body",
    "place": "a place",
    "instrument": "an instrument",
}
CATEGORY_PLURAL = {
    "animal": "animals",
    "food": "food",
    "tool": "tools",
    "clothing": "clothing",
    "vehicle": "vehicles",
    "plant": "plants",
    "furniture": "furniture",
    "person": "people",
    "body": "parts of the body",
    "place": "places",
    "instrument": "instruments",
}

OPPOSITES = (
    ("big", "small"),
    ("hot", "cold"),
    ("old", "young"),
    ("fast", "slow"),
    ("tall", "short"),
    ("happy", "sad"),
    ("light", "dark"),
    ("wet", "dry"),
    ("soft", "hard"),
    ("loud", "quiet"),
    ("rich", "poor"),
    ("clean", "dirty"),
    ("full", "empty"),
    ("thick", "thin"),
    ("wide", "narrow"),
    ("strong", "weak"),
    ("early", "late"),
    ("open", "closed"),
    ("high", "low"),
    ("good", "bad"),
    ("sweet", "sour"),
    ("kind", "cruel"),
    ("warm", "cool"),
    ("sharp", "dull"),
    ("smooth", "rough"),
    ("loose", "tight"),
    ("deep", "shallow"),
    ("awake", "asleep"),
    ("sick", "healthy"),
    ("cheap", "expensive"),
    ("clever", "stupid"),
    ("safe", "dangerous"),
    ("bright", "dim"),
    ("near", "far"),
    ("neat", "messy"),
    ("fresh", "stale"),
    ("polite", "rude"),
    ("fierce", "gentle"),
    ("heavy", "weightless"),
    ("brave", "timid"),
    ("busy", "idle"),
    ("calm", "angry"),
    ("first", "last"),
    ("true", "false"),
    ("plain", "fancy"),
)
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "gray", "pink", "purple")
NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PRONOUNS = ("he", "she", "they", "we", "i")
# Short predicates without nouns, put between a noun and its plural.
FILLERS = (
    "ran away",
    "was alone",
    "looked happy",
    "slept all day",
    "was very small",
    "sat still",
    "was quiet",
    "jumped twice",
    "is mine",
    "was old",
    "came back",
    "fell down",
)

# Verbs: "base/past" (regular pasts are spelled out too: no doubling rules to get wrong) and the kind of
# object they take: a noun category, "thing" (any portable object) or "" (none).
_VERBS = [
    "see/saw:thing",
    "find/found:thing",
    "like/liked:thing",
    "want/wanted:thing",
    "eat/ate:food",
    "run/ran:",
    "sleep/slept:",
    "swim/swam:",
    "sing/sang:",
    "drive/drove:vehicle",
    "ride/rode:vehicle",
    "wear/wore:clothing",
    "make/made:food",
    "take/took:thing",
    "hold/held:thing",
    "buy/bought:thing",
    "sell/sold:thing",
    "bring/brought:thing",
    "carry/carried:thing",
    "throw/threw:thing",
    "catch/caught:animal",
    "draw/drew:thing",
    "build/built:furniture",
    "keep/kept:thing",
    "lose/lost:thing",
    "hide/hid:thing",
    "wash/washed:clothing",
    "dust/dusted:furniture",
    "paint/painted:furniture",
    "bake/baked:food",
    "use/used:tool",
    "play/played:instrument",
    "dig/dug:",
    "break/broke:tool",
    "fix/fixed:tool",
    "sit/sat:",
    "stand/stood:",
    "walk/walked:",
    "jump/jumped:",
    "climb/climbed:",
    "grow/grew:plant",
    "chase/chased:animal",
    "bite/bit:food",
    "hunt/hunted:animal",
    "pick/picked:plant",
    "visit/visited:place",
    "write/wrote:",
    "feed/fed:animal",
    "forget/forgot:thing",
    "hear/heard:instrument",
    "wake/woke:",
    "win/won:",
    "fall/fell:",
    "cry/cried:",
    "smile/smiled:",
    "laugh/laughed:",
    "drop/dropped:thing",
    "steal/stole:thing",
    "borrow/borrowed:tool",
]

_THINGS = ("tool", "food", "clothing", "instrument")


@dataclass(frozen=True)
class Noun:
    """A noun with its plural and its category."""

    word: str
    plural: str
    category: str


@dataclass(frozen=True)
class Verb:
    """A verb's base, third-person present and past forms, and what kind of object it takes."""

    base: str
    present: str
    past: str
    takes: str


def regular_plural(word: str) -> str:
    """English's regular plural: -es after sibilants, -ies after consonant + y, -s otherwise."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def third_person(base: str) -> str:
    """'he runs', 'she carries', 'it washes': the same spelling rule as the regular plural."""
    return regular_plural(base)


def article(word: str) -> str:
    """'a' or 'an' by the first letter (the lexicon avoids words like 'uniform' where that is wrong)."""
    return "an" if word[0] in "aeiou" else "a"


def _parse_nouns() -> tuple[Noun, ...]:
    """The lexicon as `Noun`s, in a fixed order."""
    nouns = []
    for category, words in _NOUNS.items():
        for entry in words.split():
            word, _, plural = entry.partition("/")
            nouns.append(Noun(word, plural or regular_plural(word), category))
    return tuple(nouns)


def _parse_verbs() -> tuple[Verb, ...]:
    """The verb list as `Verb`s, in a fixed order."""
    verbs = []
    for entry in _VERBS:
        forms, _, takes = entry.partition(":")
        base, past = forms.split("/")
        verbs.append(Verb(base, third_person(base), past, takes))
    return tuple(verbs)


NOUNS = _parse_nouns()
VERBS = _parse_verbs()
CATEGORIES = tuple(_NOUNS)
ADJECTIVES = tuple(word for pair in OPPOSITES for word in pair)
OPPOSITE = {a: b for pair in OPPOSITES for a, b in (pair, pair[::-1])}


class Language:
    """Draws sentences of the language from one seeded random stream."""

    def __init__(self, seed: int = DEFAULT_SEED):
        self.rng = random.Random(seed)
        self.by_category = {c: tuple(n for n in NOUNS if n.category == c) for c in CATEGORIES}

    # --- word pickers -----------------------------------------------------------------------------------
    def noun(self, *categories: str) -> Noun:
        """A random noun from the given categories (all when none given)."""
        category = self.rng.choice(categories or CATEGORIES)
        return self.rng.choice(self.by_category[category])

    def adjective(self) -> str:
        """A colour or one side of an opposite pair."""
        return self.rng.choice(COLORS if self.rng.random() < 0.3 else ADJECTIVES)

    def subject(self) -> str:
        """Who does things: a pronoun or 'the <person>'."""
        if self.rng.random() < 0.25:
            return self.rng.choice(PRONOUNS)
        return "the " + self.noun("person").word

    def a(self, noun: Noun, adjective: bool = False) -> str:
        """'a red fox' / 'an owl' / 'the fox': an indefinite or definite noun phrase."""
        words = [self.adjective(), noun.word] if adjective else [noun.word]
        if self.rng.random() < 0.5:
            return " ".join(["the", *words])
        return " ".join([article(words[0]), *words])

    def obj(self, takes: str) -> str:
        """An object noun phrase fitting a verb ('' when the verb takes none)."""
        if not takes:
            return ""
        noun = self.noun(*(_THINGS if takes == "thing" else (takes,)))
        return " " + self.a(noun, adjective=self.rng.random() < 0.3)

    # --- sentences --------------------------------------------------------------------------------------
    def plural_sentence(self, noun: Noun) -> str:
        """The noun, then (right away or a few words later) a number and its plural.

        The varying distance teaches the model to find the noun by what it is, not by where it stands,
        which is what lets a fine-tune point the same knowledge at a word in a prompt.
        """
        n, p, num, pronoun = noun.word, noun.plural, self.rng.choice(NUMBERS), self.rng.choice(PRONOUNS)
        return self.rng.choice(
            (
                f"one {n}, {num} {p}.",
                f"i see one {n} and {num} {p}.",
                f"{self.a(noun)} {self.rng.choice(FILLERS)}. now there are {num} {p}.",
                f"{self.subject()} had one {n}, and soon {pronoun} had {num} {p}.",
                f"{self.subject()} wanted {article(n)} {n}, so {pronoun} got {num} {p}.",
                f"look at the {self.adjective()} {n}! no, there are {num} {p}!",
                f"the {n} {self.rng.choice(FILLERS)} and {self.rng.choice(FILLERS)}. then {num} {p} came.",
                f"the {num} {p} met one {self.adjective()} {n}.",
            )
        )

    def fact_sentence(self, noun: Noun) -> str:
        """What kind of thing the noun is."""
        if self.rng.random() < 0.5:
            return f"{article(noun.word)} {noun.word} is {CATEGORY_SINGULAR[noun.category]}."
        return f"{noun.plural} are {CATEGORY_PLURAL[noun.category]}."

    def usage_sentence(self, noun: Noun) -> str:
        """The noun doing or undergoing what things of its category do, so the category shapes its meaning."""
        s, x, c = self.subject(), self.a(noun, adjective=self.rng.random() < 0.4), noun.category
        place = self.noun("place").word
        options = {
            "animal": (
                f"{x} ran across the {place}.",
                f"{x} sleeps near the {place}.",
                f"{x} ate {self.a(self.noun('food'))}.",
                f"{s} fed {x}.",
                f"{x} can swim and run.",
            ),
            "food": (
                f"{s} ate {x}.",
                f"{s} baked {x} in the kitchen.",
                f"{x} tastes {self.rng.choice(('sweet', 'sour', 'good', 'bad'))}.",
                f"{s} made {x} for dinner.",
            ),
            "tool": (
                f"{s} used {x} to fix the {self.noun('furniture').word}.",
                f"{s} borrowed {x}.",
                f"{s} broke {x} at work.",
            ),
            "clothing": (f"{s} wore {x}.", f"{s} washed {x}.", f"{x} keeps {self.rng.choice(PRONOUNS)} warm."),
            "vehicle": (f"{s} drove {x} to the {place}.", f"{s} rode in {x}.", f"{x} carried people to the {place}."),
            "plant": (f"{x} grew in the {place}.", f"{s} picked {x}.", f"{x} has green leaves."),
            "furniture": (f"{s} sat on {x}.", f"{x} stood in the room.", f"{s} painted {x}.", f"{s} dusted {x}."),
            "person": (f"{x} walked to the {place}.", f"{x} said hello.", f"{x} smiled at {self.subject()}."),
            "body": (
                f"{s} hurt {self.rng.choice(('his', 'her', 'their', 'my'))} {noun.word}.",
                f"{self.a(self.noun('animal', 'person'))} has {article(noun.word)} {noun.word}.",
            ),
            "place": (f"{s} went to {x}.", f"{x} is far from the {self.noun('place').word}.", f"{s} visited {x}."),
            "instrument": (f"{s} played {x}.", f"{s} heard {x}.", f"the sound of {x} was loud."),
        }[c]
        return self.rng.choice(options)

    def neutral_sentence(self, noun: Noun) -> str:
        """The noun in a frame that fits every category: its meaning must come from the word itself."""
        s, x = self.subject(), self.a(noun, adjective=self.rng.random() < 0.5)
        return self.rng.choice(
            (
                f"{s} saw {x}.",
                f"{s} found {x} near the {self.noun('place').word}.",
                f"{s} liked {x}.",
                f"there is {x} in the picture.",
                f"{s} drew {x}.",
                f"{s} talked about {x}.",
            )
        )

    def opposite_sentence(self, a: str) -> str:
        """An adjective and its opposite, near each other or a few words apart."""
        b, noun = OPPOSITE[a], self.noun()
        return self.rng.choice(
            (
                f"the opposite of {a} is {b}.",
                f"{a} is the opposite of {b}.",
                f"{a} and {b} are opposites.",
                f"the {noun.word} is not {a}, it is {b}.",
                f"the {noun.word} was {a} before, but now it is {b}.",
                f"one {noun.word} is {a} and the other is {b}.",
            )
        )

    def verb_sentence(self, verb: Verb) -> str:
        """A verb in its base, present and past forms, the past often a few words after the others."""
        s, pronoun = self.subject(), self.rng.choice(PRONOUNS)
        present = verb.base if s in ("they", "we", "i") else verb.present
        return self.rng.choice(
            (
                f"every day {s} {present}{self.obj(verb.takes)}. yesterday {s} {verb.past}{self.obj(verb.takes)}.",
                f"{s} will {verb.base}{self.obj(verb.takes)} tomorrow, and yesterday {pronoun} "
                f"{verb.past}{self.obj(verb.takes)}.",
                f"{s} can {verb.base}{self.obj(verb.takes)}. last week {pronoun} {verb.past}{self.obj(verb.takes)}.",
                f"{s} {verb.past}{self.obj(verb.takes)}.",
                f"{s} likes to {verb.base}{self.obj(verb.takes)}.",
            )
        )

    def round_sentences(self) -> list[str]:
        """One pass over the lexicon: every noun, adjective and verb appears with its related forms."""
        sentences = []
        for noun in NOUNS:
            sentences.append(self.plural_sentence(noun))
            kind = self.rng.random()
            if kind < 0.3:
                sentences.append(self.fact_sentence(noun))
            elif kind < 0.7:
                sentences.append(self.usage_sentence(noun))
            else:
                sentences.append(self.neutral_sentence(noun))
        sentences += [self.opposite_sentence(a) for a in ADJECTIVES]
        sentences += [self.verb_sentence(v) for v in VERBS for _ in range(2)]
        self.rng.shuffle(sentences)
        return sentences


def documents(rounds: int = 40, seed: int = DEFAULT_SEED) -> list[str]:
    """The pretraining corpus: `rounds` passes over the lexicon, cut into short paragraphs."""
    language = Language(seed)
    docs = []
    for _ in range(rounds):
        sentences = language.round_sentences()
        while sentences:
            size = language.rng.randint(4, 12)
            docs.append(" ".join(sentences[:size]))
            sentences = sentences[size:]
    return docs
