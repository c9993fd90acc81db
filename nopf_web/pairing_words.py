"""The pairing-code word list: 256 short, distinct English words.

Exactly 256, so each word carries 8 bits; no word is a prefix of another, and
all are lower-case ASCII letters. Order matters only for tests: codes pick
words with :mod:`secrets`.
"""

from __future__ import annotations

WORDS: tuple[str, ...] = (
    "acorn", "adept", "admiral", "agate", "alpine", "amber", "anchor", "angle", "apple",
    "april", "arbor", "arctic", "arrow", "aspen", "atlas", "attic", "autumn", "avocado",
    "badge", "bagel", "bamboo", "banjo", "barley", "basil", "basket", "beacon", "beaver",
    "berry", "bicycle", "birch", "biscuit", "bison", "blanket", "blossom", "bonnet", "bottle",
    "boulder", "bramble", "breeze", "brick", "bridge", "bronze", "brook", "bucket", "buffalo",
    "bugle", "burrow", "butter", "cabin", "cactus", "camel", "canal", "candle", "canoe",
    "canvas", "canyon", "carbon", "cargo", "carpet", "carrot", "castle", "cedar", "cello",
    "chalk", "cherry", "chess", "chimney", "cider", "cinnamon", "circus", "citrus", "clover",
    "cobalt", "cocoa", "coffee", "comet", "compass", "copper", "coral", "cotton", "cougar",
    "crane", "crater", "crayon", "cricket", "crystal", "cuckoo", "daisy", "delta", "desert",
    "diamond", "dolphin", "domino", "donkey", "dragon", "drum", "eagle", "easel", "echo",
    "eclipse", "elephant", "ember", "engine", "falcon", "feather", "fennel", "ferry", "fiddle",
    "flint", "forest", "fossil", "fountain", "fox", "galaxy", "garden", "garlic", "gazelle",
    "geyser", "ginger", "globe", "goblet", "granite", "grape", "gravel", "guitar", "hammer",
    "harbor", "harvest", "hazel", "helmet", "heron", "hickory", "honey", "horizon", "hornet",
    "iceberg", "igloo", "indigo", "island", "ivory", "jacket", "jaguar", "jasmine", "jelly",
    "jungle", "kayak", "kettle", "kiwi", "koala", "ladder", "lagoon", "lantern", "lemon",
    "lily", "linen", "lizard", "llama", "lobster", "locket", "lotus", "magnet", "mango",
    "maple", "marble", "meadow", "melon", "meteor", "mirror", "monsoon", "mosaic", "muffin",
    "mustard", "nectar", "nickel", "nomad", "noodle", "nutmeg", "oasis", "ocean", "olive",
    "onion", "opal", "orbit", "orchid", "otter", "oyster", "paddle", "palace", "panda",
    "parrot", "pebble", "pepper", "piano", "pilot", "pine", "pixel", "planet", "plum", "pond",
    "poppy", "potato", "prairie", "prism", "pumpkin", "puzzle", "quartz", "quill", "rabbit",
    "radar", "radish", "raven", "ribbon", "river", "robin", "rocket", "saddle", "saffron",
    "salmon", "sapphire", "satin", "sequoia", "silver", "sparrow", "spider", "spruce",
    "squirrel", "summit", "sunset", "swallow", "tango", "teapot", "temple", "thimble",
    "thistle", "thunder", "tiger", "timber", "tomato", "topaz", "tornado", "tulip", "tundra",
    "turnip", "turtle", "velvet", "violet", "volcano", "waffle", "walnut", "walrus", "whistle",
    "willow", "winter", "wizard", "zebra", "zephyr",
)
