"""
Stories: a generated story language with known latent variables, the text counterpart of TokFSM (fsm.py).

Simple English stories in TinyStories' register, written from a seed by a small grammar. Each story has two
latent variables drawn independently and uniformly, and carried from its first sentences to its last:
- its **topic**, one of 16 (dragon, princess, pirate, ...): the words of the topic slots (nouns, places, verbs)
  come from the topic's vocabulary, and vocabularies overlap ("fire" is dragon's and tent's, "sang" is cake's,
  drum's and tent's) as real topics share words;
- its **mood**, one of 4 (happy, sad, scared, angry): the words of the mood slots (adjectives, actions).
Names (with their he/she), frames ("One day, Lily went to the ..."), adjectives, toys and animals are shared by all
stories. The opening names the mood and the second sentence the topic's key word (its name), each unique to its
value; the body is 3-6 sentences drawn from 14 frames, then one of 2 endings.

    python stories.py        # prints the entropy floor, the vocabulary size and a few stories with their labels

    lang = StoryLanguage(seed=0); s = lang.sample(100)    # Stories: tokens and their truth, as numpy arrays
    lang.decode(s.tokens[:60]); lang.entropy_floor(); lang.truth_of("Once upon a time, ...")

Tokens are words: every word (with its leading space, as GPT-2's BPE writes it), "," and "." is one token, so each
slot of the grammar is exactly one token and the truth is exact at every token, and the vocabulary (227 tokens) keeps
the model small (GPT-2's 50,257-token output layer alone, at d=128, would hold 6.4 M weights, 25 times the 0.26 M of
config/stories.py's whole model) and its topics whole words, as regexes read them. The tokenizer is written as a
`tokenizers` tokenizer.json (a WordLevel model behind the byte-level pre-tokenizer), which plumbing/tokens.py loads
as the "neox" kind, so sample.py, analyze.py and topics.py decode the text as any other dataset's.

Truth per token (`Stories`): the story's topic and mood, whether the NEXT token is written by a topic slot or a
mood slot (`topic_next`, `mood_next`), and whether the latent has been written yet (`topic_seen`, `mood_seen`: from
the topic's key word, the opening's mood word on). Where the next token is the latent's and it has been written
before (in the window a model reads), that latent decides the next word: the activations there must carry it.

Entropy floor (exact): every story is written by one derivation, and the derivation can be read back from its
tokens (the frames of one place in the story differ in their first word, or in a word of disjoint sets after a
shared start; checked by `check_unambiguous`), so H(story) = H(derivation) = the sum of the entropies of the choices,
each uniform. Stories are i.i.d. and each ends with the end-of-text token, so the stream's entropy rate is
E[H(story)] / E[tokens per story] nats per token (`entropy_floor`): no model does better on average, whatever its
context. A model that reads a window cut inside a story misses the latents written before the cut, so its loss on
train.py's random windows is above the floor; `log_prob` scores stories exactly (a Monte Carlo check in the tests).

Scoring (analyze.py and topics.py use these): `code_truth` and `summarize` (precision and recall of every code for
every value of each latent, where it decides the next word and over all tokens, the dense heuristic, the best neuron),
`latent_of_text` (the topic and mood the grammar gives a generated text's words, to score steering).
"""

import json
import math
import os
import re
from collections import namedtuple

import numpy as np

TOPICS = {  # topic (its key word) -> nouns, places, verbs; words shared between topics are real overlaps
    "dragon": (["fire", "gold", "wings", "egg"], ["mountain", "cave"], ["flew", "roared"]),
    "princess": (["crown", "king", "gold", "dress"], ["castle", "tower"], ["danced", "bowed"]),
    "pirate": (["ship", "treasure", "map", "parrot"], ["sea", "island"], ["sailed", "dug"]),
    "rocket": (["star", "moon", "planet", "helmet"], ["space", "sky"], ["flew", "zoomed"]),
    "robot": (["button", "wheel", "metal", "wire"], ["lab", "city"], ["beeped", "built"]),
    "flower": (["seed", "bee", "rain", "tree"], ["garden", "park"], ["planted", "grew"]),
    "fish": (["shell", "wave", "boat", "sand"], ["sea", "beach"], ["swam", "splashed"]),
    "cow": (["pig", "hen", "egg", "tractor"], ["farm", "barn"], ["fed", "grew"]),
    "snowman": (["snow", "ice", "scarf", "sled"], ["hill", "park"], ["slid", "skated"]),
    "cake": (["party", "gift", "balloon", "candle"], ["house", "kitchen"], ["baked", "sang"]),
    "bear": (["tree", "honey", "berry", "owl"], ["forest", "woods"], ["climbed", "sniffed"]),
    "teacher": (["book", "pencil", "desk", "paper"], ["school", "class"], ["read", "wrote"]),
    "drum": (["song", "guitar", "bell", "piano"], ["stage", "park"], ["drummed", "sang"]),
    "soup": (["pot", "spoon", "bread", "apple"], ["kitchen", "house"], ["cooked", "baked"]),
    "train": (["track", "ticket", "wheel", "whistle"], ["station", "city"], ["rode", "zoomed"]),
    "tent": (["fire", "star", "lamp", "map"], ["woods", "lake"], ["hiked", "sang"]),
}
MOODS = {  # mood -> adjectives, actions
    "happy": (["happy", "glad", "cheerful"], ["smiled", "laughed", "giggled"]),
    "sad": (["sad", "gloomy", "lonely"], ["cried", "sighed", "sobbed"]),
    "scared": (["scared", "afraid", "nervous"], ["shivered", "trembled", "gasped"]),
    "angry": (["angry", "grumpy", "cross"], ["shouted", "stomped", "yelled"]),
}
NAMES = {"girl": ["Lily", "Mia", "Sue", "Anna", "Amy", "Lucy"], "boy": ["Tom", "Ben", "Max", "Tim", "Sam", "Jack"]}
PRONOUNS = {"girl": ("she", "She"), "boy": ("he", "He")}
COMMON = {"adj": ["big", "small", "shiny", "old", "red", "blue", "soft", "tall"],
          "toy": ["ball", "kite", "doll", "puzzle"], "animal": ["dog", "cat", "bird", "frog"]}
# The story: OPENING, then TOPIC_SENTENCES, then BODY_MIN..BODY_MAX sentences of BODY, then ENDINGS, one frame of
# each uniformly. Slots: {noun} {place} {verb} {key} (topic), {adj_m} {act} (mood), {kid} (girl or boy), {name},
# {pron} {Pron} (copies: the story's name and its he/she), {adj} {toy} {animal} (shared).
OPENING = ["Once upon a time , there was a {adj_m} {kid} named {name} ."]
TOPIC_SENTENCES = ["{name} loved the {key} very much .", "{Pron} lived near a big {key} ."]
BODY = ["One day , {name} went to the {place} .", "{name} saw a {adj} {noun} .",
        "{name} wanted to play with the {noun} .", "{Pron} felt very {adj_m} .", "{Pron} {act} and {verb} all day .",
        "Then , {pron} found a {noun} near the {place} .", "The {noun} was {adj} and {adj} .",
        "Every day , {pron} {act} .", "A {animal} came to see the {key} .",
        "After that , {pron} played with a {toy} and {act} .", "It was a {adj_m} day .",
        "{name} {verb} with the {key} .", "So {pron} {act} again .", "{name} was {adj_m} ."]
ENDINGS = ["From that day on , {name} was always {adj_m} .", "In the end , {pron} {act} with the {key} ."]
BODY_MIN, BODY_MAX = 3, 6
TOPIC_SLOTS, MOOD_SLOTS, COPIES = ("noun", "place", "verb", "key"), ("adj_m", "act"), ("name", "pron", "Pron")
EOT = "<|endoftext|>"

Stories = namedtuple("Stories", "tokens topic mood topic_next mood_next topic_seen mood_seen story logp")
Stories.__doc__ = """Sampled stories as one token stream, each story followed by the end-of-text token; every field
but logp is an (N,) numpy array over the stream's tokens: tokens (int64 ids), topic and mood (int64: the story's
latents, indices into TOPIC_NAMES and MOOD_NAMES), topic_next and mood_next (bool: the next token is written by a topic
or a mood slot; False at the last token), topic_seen and mood_seen (bool: the token is, or follows, the first word of
its story that the latent wrote: the topic's key, the opening's mood), story (int64: the story's index).
logp: (n,) float64, ln p of each story."""
TOPIC_NAMES, MOOD_NAMES = list(TOPICS), list(MOODS)


def parse_frame(frame):
    """"{Pron} felt very {adj_m} ." -> [("slot", "Pron"), ("word", "felt"), ...]."""
    return [("slot", w[1:-1]) if w.startswith("{") else ("word", w) for w in frame.split()]


class StoryLanguage:
    """The story grammar, its token vocabulary and its sampler.

    Args:
        seed: seed of the sampler (numpy's PCG64): the same seed writes the same stories on every machine.
    Attributes:
        vocab: list of token strings (id -> string, byte-level spaces as in GPT-2: "Ġdragon"); id 0 is <|endoftext|>.
        vocab_size, eot (= 0), topic_words / mood_words: {id: set of topic / mood indices whose slots write it}.
    Raises ValueError if the grammar is ambiguous (check_unambiguous) or its slot vocabularies overlap across kinds.
    """

    def __init__(self, seed=0):
        self.seed, self.rng = seed, np.random.default_rng(seed)
        self.groups = [[parse_frame(f) for f in g] for g in (OPENING, TOPIC_SENTENCES, BODY, ENDINGS)]
        words = ["Once"]  # the only word that starts a text, so the only one written without a space
        for g in self.groups:
            words += [w for f in g for kind, w in f if kind == "word"]
        for t in TOPICS.values():
            words += [w for part in t for w in part]
        words += list(TOPICS) + [w for m in MOODS.values() for part in m for w in part] + list(NAMES)
        words += [n for ns in NAMES.values() for n in ns] + [p for ps in PRONOUNS.values() for p in ps]
        words += [w for ws in COMMON.values() for w in ws]
        self.vocab = [EOT, "Once"] + sorted({self.token(w) for w in words} - {"Once"})
        self.id = {s: i for i, s in enumerate(self.vocab)}
        self.vocab_size, self.eot = len(self.vocab), 0
        self.topic_words = self._owners([[*n, *p, *v, k] for k, (n, p, v) in TOPICS.items()])
        self.mood_words = self._owners([[*a, *b] for a, b in MOODS.values()])
        shared = {self.id[self.token(w)] for ws in [*COMMON.values(), *NAMES.values(), list(NAMES)] for w in ws}
        shared |= {self.id[self.token(w)] for g in self.groups for f in g for kind, w in f if kind == "word"}
        if set(self.topic_words) & set(self.mood_words) or (set(self.topic_words) | set(self.mood_words)) & shared:
            raise ValueError("a word is written by slots of two kinds (topic, mood, shared or a frame's own words): the "
                             "truth of a text's words would be unclear")
        check_unambiguous(self)

    @staticmethod
    def token(word):
        """A word's token string: "," and "." as they are, "Once" (a text's first word) bare, others after a space."""
        return word if word in (",", ".", "Once") else "Ġ" + word

    def _owners(self, vocabs):
        out = {}
        for i, ws in enumerate(vocabs):
            for w in ws:
                out.setdefault(self.id[self.token(w)], set()).add(i)
        return out

    # ---------------------------------------------------------------- the grammar
    def slot_words(self, slot, topic, mood, kid):
        """The words a slot may write in a story with these latents (kid: "girl" or "boy"), a list."""
        if slot in ("noun", "place", "verb"):
            return TOPICS[TOPIC_NAMES[topic]][("noun", "place", "verb").index(slot)]
        if slot == "key":
            return [TOPIC_NAMES[topic]]
        if slot in MOOD_SLOTS:
            return MOODS[MOOD_NAMES[mood]][MOOD_SLOTS.index(slot)]
        if slot == "kid":
            return list(NAMES)
        if slot == "name":
            return NAMES[kid]
        if slot in ("pron", "Pron"):
            return [PRONOUNS[kid][slot == "Pron"]]
        return COMMON[slot]

    def entropy_floor(self):
        """The stream's entropy rate in nats per token, exact (module docstring): E[H(story)] / E[tokens + EOT].
        Also returns E[H(story)] (nats) and E[tokens per story] with the end-of-text token, as a tuple of 3 floats."""
        def frame(f):  # (entropy of the slot choices averaged over the latents, tokens)
            h = 0.0
            for kind, s in f:
                if kind == "slot" and s not in COPIES and s != "key" and s != "kid":
                    sizes = [len(self.slot_words(s, t, m, "girl"))
                             for t in range(len(TOPICS)) for m in range(len(MOODS))]
                    h += float(np.mean(np.log(sizes)))
            return h, len(f)

        def group(g):  # uniform choice of a frame, then its slots
            hs, ls = zip(*map(frame, g))
            return math.log(len(g)) + float(np.mean(hs)), float(np.mean(ls))

        (ho, lo), (ht, lt), (hb, lb), (he, le) = map(group, self.groups)
        n_body = (BODY_MIN + BODY_MAX) / 2
        h = (math.log(len(TOPICS)) + math.log(len(MOODS)) + math.log(len(NAMES)) + math.log(len(NAMES["girl"]))
             + ho + ht + math.log(BODY_MAX - BODY_MIN + 1) + n_body * hb + he)  # latents, name, frames, length
        tokens = lo + lt + n_body * lb + le + 1
        return h / tokens, h, tokens

    # ---------------------------------------------------------------- sampling
    def sample(self, n, seed=None):
        """n stories as a `Stories` stream (each followed by EOT), from this language's generator (or `seed`'s).
        Raises ValueError for n < 1."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive number of stories, got {n!r}")
        rng = self.rng if seed is None else np.random.default_rng(seed)
        cols = {k: [] for k in Stories._fields if k != "logp"}
        logp = np.zeros(n)
        for i in range(n):  # a loop over stories, each a few dozen tokens
            ids, kinds, logp[i], topic, mood = self._story(rng)
            ids.append(self.eot)
            kinds.append("eot")
            cols["tokens"] += ids
            cols["topic"] += [topic] * len(ids)
            cols["mood"] += [mood] * len(ids)
            cols["topic_next"] += [k in TOPIC_SLOTS for k in kinds[1:]] + [False]
            cols["mood_next"] += [k in MOOD_SLOTS for k in kinds[1:]] + [False]
            for latent, slots in (("topic", TOPIC_SLOTS), ("mood", MOOD_SLOTS)):
                first = next(j for j, k in enumerate(kinds) if k in slots)
                cols[f"{latent}_seen"] += [j >= first for j in range(len(kinds))]
            cols["story"] += [i] * len(ids)
        arr = {k: np.array(v, dtype=bool if k.endswith(("next", "seen")) else np.int64) for k, v in cols.items()}
        return Stories(**arr, logp=logp)

    def _story(self, rng):
        """One story: (token ids, the slot kind that wrote each ("word" for a frame's own words), ln p, topic, mood)."""
        topic, mood = int(rng.integers(len(TOPICS))), int(rng.integers(len(MOODS)))
        kid = list(NAMES)[int(rng.integers(2))]
        logp = -math.log(len(TOPICS)) - math.log(len(MOODS))
        n_body = int(rng.integers(BODY_MIN, BODY_MAX + 1))
        logp -= math.log(BODY_MAX - BODY_MIN + 1)
        name = None
        ids, kinds = [], []
        plan = [self.groups[0], self.groups[1]] + [self.groups[2]] * n_body + [self.groups[3]]
        for g in plan:
            f = g[int(rng.integers(len(g)))]
            logp -= math.log(len(g))
            for kind, s in f:
                if kind == "word":
                    w = s
                elif s == "kid":
                    w = kid
                    logp -= math.log(2)
                elif s == "name" and name is not None:
                    w = name
                else:
                    ws = self.slot_words(s, topic, mood, kid)
                    w = ws[int(rng.integers(len(ws)))]
                    logp -= math.log(len(ws))
                    name = w if s == "name" else name
                ids.append(self.id[self.token(w)])
                kinds.append(s if kind == "slot" else "word")
        return ids, kinds, logp, topic, mood

    # ---------------------------------------------------------------- reading text back
    def encode(self, text):
        """Token ids of a text in this language (words and ",", "." separated by spaces, or "." glued as written).
        Raises ValueError naming the first word that is not in the vocabulary."""
        out = []
        for w in re.findall(r"[A-Za-z]+|[,.]|<\|endoftext\|>", text):
            starts = not out or out[-1] == self.eot  # a text's first word is written without a space
            s = w if w == EOT or (starts and w == "Once") else self.token(w)
            if s not in self.id:
                raise ValueError(f"{w!r} is not a word of the story language")
            out.append(self.id[s])
        return out

    def decode(self, ids):
        """Text of token ids: "Ġ" is a space."""
        return "".join(self.vocab[int(i)] if int(i) < self.vocab_size else "<unk>" for i in ids).replace("Ġ", " ")

    def log_prob(self, ids):
        """ln p(story) of one story's token ids (without EOT), read back from the tokens alone: the sum over every
        derivation (latents, frames, slot choices) that writes them; -inf if none does."""
        words = [self.vocab[int(i)].lstrip("Ġ") for i in ids]
        total = -math.inf
        for topic in range(len(TOPICS)):
            for mood in range(len(MOODS)):
                for kid in NAMES:
                    lp = self._parse(words, topic, mood, kid)  # -inf unless the latents can write the words
                    if lp > -math.inf:
                        total = np.logaddexp(total, lp - math.log(len(TOPICS) * len(MOODS)))
        return float(total)

    def _parse(self, words, topic, mood, kid):
        """ln p(words, kid | topic, mood): each frame matched at each place in the story (sum over matches)."""
        def frames(pos, g, name):  # [(end, ln p of the frame's choices, name)] for every frame of g matching at pos
            out = []
            for f in g:
                lp, nm, p = -math.log(len(g)), name, pos
                for kind, s in f:
                    w = words[p] if p < len(words) else None
                    if kind == "word" or (s == "name" and nm is not None):
                        ok = w == (s if kind == "word" else nm)
                    else:
                        ws = self.slot_words(s, topic, mood, kid)
                        ok = w in ws
                        lp -= math.log(len(ws))
                        nm = w if s == "name" and ok else nm
                    if not ok:
                        break
                    p += 1
                else:
                    out.append((p, lp, nm))
            return out

        states = {(0, None): 0.0}  # after the opening and topic sentence: (position, name) -> ln p
        for g in self.groups[:2]:
            nxt = {}
            for (pos, nm), lp in states.items():
                for end, l, nm2 in frames(pos, g, nm):
                    nxt[(end, nm2)] = np.logaddexp(nxt.get((end, nm2), -math.inf), lp + l)
            states = nxt
        total = -math.inf
        for n_body in range(BODY_MIN, BODY_MAX + 1):
            cur = states
            for g in [self.groups[2]] * n_body + [self.groups[3]]:
                nxt = {}
                for (pos, nm), lp in cur.items():
                    for end, l, nm2 in frames(pos, g, nm):
                        nxt[(end, nm2)] = np.logaddexp(nxt.get((end, nm2), -math.inf), lp + l)
                cur = nxt
            for (pos, _), lp in cur.items():
                if pos == len(words):
                    total = np.logaddexp(total, lp - math.log(BODY_MAX - BODY_MIN + 1))
        return float(total)

    def truth_of(self, text):
        """The truth of one story's text, read from its words alone: (topic, mood, topic_next (N,) bool, mood_next (N,)
        bool) over its N tokens (end-of-text not included). Raises ValueError when the grammar cannot write the text or
        two latent values could have (which check_unambiguous rules out for this grammar)."""
        ids = self.encode(text)
        words = [self.vocab[i].lstrip("Ġ") for i in ids]
        fits = [(t, m) for t in range(len(TOPICS)) for m in range(len(MOODS))
                if any(self._parse(words, t, m, kid) > -math.inf for kid in NAMES)]
        if len(fits) != 1:
            raise ValueError(f"{len(fits)} (topic, mood) pairs write this text: it is not one story of the language")
        nxt = lambda owners: np.array([i in owners for i in ids[1:]] + [False])  # noqa: E731
        return fits[0][0], fits[0][1], nxt(self.topic_words), nxt(self.mood_words)

    def max_story_tokens(self):
        """The most tokens a story can have, its end-of-text token included."""
        return sum(max(map(len, g)) * (BODY_MAX if g is self.groups[2] else 1) for g in self.groups) + 1

    def latent_of_text(self, ids):
        """The topic and mood the grammar gives a text's words: for each latent, the value whose slots write the most
        of the text's topic (mood) words, or -1 when none does or two values tie. Returns (topic, mood, topic counts
        (16,), mood counts (4,)); a word shared by several topics counts for each."""
        tc, mc = np.zeros(len(TOPICS), dtype=np.int64), np.zeros(len(MOODS), dtype=np.int64)
        for i in ids:
            for t in self.topic_words.get(int(i), ()):
                tc[t] += 1
            for m in self.mood_words.get(int(i), ()):
                mc[m] += 1
        best = lambda c: int(c.argmax()) if c.max() > 0 and (c == c.max()).sum() == 1 else -1  # noqa: E731
        return best(tc), best(mc), tc, mc

    # ---------------------------------------------------------------- files
    def tokenizer_json(self):
        """The vocabulary as a `tokenizers` tokenizer.json string (WordLevel behind the byte-level pre-tokenizer and
        decoder, <|endoftext|> special): plumbing/tokens.py loads it as the "neox" kind."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel(vocab=self.id, unk_token=EOT))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(EOT, special=True)])
        return tok.to_str()


def check_unambiguous(lang):
    """Raise ValueError unless every story's derivation can be read back from its tokens: at each place in the story
    (and between the body and the ending, which may follow any body sentence), two frames first differ at an item
    whose possible words (over every latent value) are disjoint."""
    def words(item):
        kind, s = item
        if kind == "word":
            return {s}
        return {w for t in range(len(TOPICS)) for m in range(len(MOODS)) for k in NAMES
                for w in lang.slot_words(s, t, m, k)}

    body, ending = lang.groups[2], lang.groups[3]
    for g in [lang.groups[0], lang.groups[1], body + ending]:
        for i, a in enumerate(g):
            for b in g[i + 1:]:
                j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
                if j is None or words(a[j]) & words(b[j]):
                    raise ValueError(f"frames {a} and {b} cannot be told apart from their words")


# ---------------------------------------------------------------------------------------------- codes against the truth
LATENTS = {"topic": TOPIC_NAMES, "mood": MOOD_NAMES}
PROMPTS = ["", "Once", "Once upon a time,", "Once upon a time, there was a"]  # none names a latent


def regex_of(latent, value):
    """The paper's kind of topic regex (Table 3: "dragon"): the value's name as a word, e.g. r"\bdragon\b"."""
    return rf"\b{LATENTS[latent][value]}\b"


def load_truth(data_dir):
    """The per-token truth of a stories dataset's val.bin ({name: array} of save_truth), or None when the dataset
    has none (not the story language). Raises ConfigError for an unreadable file."""
    from plumbing.configuration import ConfigError

    path = os.path.join(data_dir, "val_truth.npz")
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # a torn or foreign file
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}): run data/prepare.py stories again") from None


def window_truth(truth, tokens, val):
    """The truth at the tokens of consecutive val windows from offset 0 (plumbing/tokens.lm_batches, as analyze.py and
    topics.py read them): {name: (n, T) tensor}, the arrays of save_truth and, per latent, "<latent>_known": the word
    that wrote the latent (Stories.topic_seen) is in the window at or before the token, so that a model reading the
    window could know it. tokens: (n, T). ConfigError if they are not val's first n*T tokens."""
    import torch

    from plumbing.configuration import ConfigError

    n, T = tokens.shape
    same = len(truth["topic"]) >= n * T and np.array_equal(np.asarray(val[: n * T], np.int64), tokens.reshape(-1).numpy())
    if not same:
        raise ConfigError("the codes were not read on this dataset's val.bin from its start: collect them again "
                          "without --codes, with this dataset")
    wt = {k: torch.from_numpy(truth[k][: n * T].astype(np.int64).reshape(n, T))
          for k in ("topic", "mood", "topic_next", "mood_next", "topic_seen", "mood_seen", "story")}
    story = truth["story"][: n * T]
    for latent in LATENTS:  # known: the word that wrote the latent is in the window, at or before the token
        seen = truth[f"{latent}_seen"][: n * T]
        reveal = seen & ~np.concatenate([[False], seen[:-1] & (story[:-1] == story[1:])])  # the latent's first word
        reveal = torch.from_numpy(reveal.reshape(n, T))
        last = torch.where(reveal, wt["story"], torch.full_like(wt["story"], -1)).cummax(1).values  # (n, T)
        wt[f"{latent}_known"] = (last == wt["story"]).long()
    return wt


def dense_stories(codes, story, num_codes):
    """The paper's selection heuristic (Section 5.2), per story: (S, M) bool, code c fires on more than half of the
    tokens read of story s. codes: (N, k) ids (-1 = none), story: (N,) story indices (any range)."""
    import torch

    sid = story - story.min()
    S, ok = int(sid.max()) + 1, codes >= 0
    flat = (sid.unsqueeze(1) * num_codes + codes.clamp(min=0).long())[ok]
    counts = torch.bincount(flat, minlength=S * num_codes).view(S, num_codes)
    return counts > 0.5 * torch.bincount(sid, minlength=S).unsqueeze(1)


def code_truth(col, wt):
    """Every code of every book against both latents: {latent: {book: {"next": (counts, P, R), "all": (...), "dense":
    (S, M) bool}}}, P and R (L, M) over the tokens where the latent decides the next word ("next": the next word is
    written by one of its slots and the latent is known in the window, window_truth) or over all tokens."""
    from evaluate import precision_recall

    out = {}
    for latent, names in LATENTS.items():
        labels, where = wt[latent].reshape(-1), (wt[f"{latent}_next"] * wt[f"{latent}_known"]).reshape(-1).bool()
        out[latent] = {}
        for book, site, g, cb in col["books"]:
            codes = col["codes"][site][:, :, g].reshape(-1, cb.k)  # (N, k)
            out[latent][book] = {"next": precision_recall(codes[where], labels[where], len(names), cb.num_codes),
                                 "all": precision_recall(codes, labels, len(names), cb.num_codes),
                                 "dense": dense_stories(codes, wt["story"].reshape(-1), cb.num_codes)}
    return out


def best_per_value(tables):
    """For each value of a latent, its best code over all books by F1 where it decides the next word:
    [(book, code, P, R)], one per value."""
    from evaluate import f1

    best = []
    for v in range(next(iter(tables.values()))["next"][1].shape[0]):
        scores = {b: f1(t["next"][1][v], t["next"][2][v]) for b, t in tables.items()}  # {book: (M,)}
        _, b, c = max((x.max().item(), b, int(x.argmax())) for b, x in scores.items())
        best.append((b, c, tables[b]["next"][1][v, c].item(), tables[b]["next"][2][v, c].item()))
    return best


def summarize(tables, wt, model=None, tokens=None, batch_size=64):
    """Per latent value: its best code (P, R where it decides the next word and over all tokens), whether it owns a
    code (P >= 0.9 and R >= 0.9 in one book, where it decides), the dense heuristic's pick scored against the truth,
    and (with model) the best single MLP neuron at the best code's recall (evaluate.neuron_baseline)."""
    import torch

    from evaluate import mlp_neurons, neuron_baseline

    summary = {}
    for latent, names in LATENTS.items():
        sid = wt["story"].reshape(-1) - wt["story"].min()
        value = torch.zeros(int(sid.max()) + 1, dtype=torch.long).scatter_(0, sid, wt[latent].reshape(-1))  # (S,)
        best = best_per_value(tables[latent])
        rows = []
        for v, (b, c, p, r) in enumerate(best):
            t = tables[latent][b]
            owned = any(((x["next"][1][v] >= 0.9) & (x["next"][2][v] >= 0.9)).any().item()
                        for x in tables[latent].values())
            dense = []  # (story precision, stories, book, code) of every code dense on some story
            for bk, x in tables[latent].items():
                d = x["dense"]  # (S, M)
                n = d.sum(0)
                prec = (d & (value == v).unsqueeze(1)).sum(0) / n.clamp(min=1)
                cc = int((prec + 1e-6 * n).argmax())
                if n[cc] > 0:
                    dense.append((prec[cc].item(), int(n[cc]), bk, cc))
            row = {"value": names[v], "book": b, "code": c, "P_next": p, "R_next": r,
                   "P_all": t["all"][1][v, c].item(), "R_all": t["all"][2][v, c].item(), "owned": owned}
            if dense:
                sp, n, bk, cc = max(dense)
                x = tables[latent][bk]
                row["dense"] = {"book": bk, "code": cc, "story_precision": sp, "stories": n,
                                "P_next": x["next"][1][v, cc].item(), "R_next": x["next"][2][v, cc].item()}
            rows.append(row)
        if model is not None:
            where = (wt[f"{latent}_next"] * wt[f"{latent}_known"]).bool()
            r_, c_ = where.nonzero(as_tuple=True)
            acts = mlp_neurons(model, tokens, r_, c_, batch_size, next(model.parameters()).device)
            prec, neuron, _ = neuron_baseline(acts, wt[latent][r_, c_], torch.tensor([x["R_next"] for x in rows]))
            H = acts.shape[1] // len(model.transformer.h)
            for x, pn, nn in zip(rows, prec.tolist(), neuron.tolist()):  # its largest activation: the forcing value
                x["neuron"] = {"neuron": nn, "layer": nn // H, "index": nn % H, "P_next": pn,
                               "max": acts[:, nn].max().item()}
        summary[latent] = {"values": rows, "owned": sum(x["owned"] for x in rows), "of": len(rows),
                           "tokens_next": int((wt[f"{latent}_next"] * wt[f"{latent}_known"]).sum()),
                           "tokens_next_unknown": int((wt[f"{latent}_next"] * (1 - wt[f"{latent}_known"])).sum()),
                           "tokens_all": wt[latent].numel(),
                           "mean_P_next": float(np.mean([x["P_next"] for x in rows])),
                           "mean_R_next": float(np.mean([x["R_next"] for x in rows]))}
    return summary


def print_summary(summary):
    """The tables of `summarize`, one line per latent value."""
    for latent, s in ((k, summary[k]) for k in LATENTS):
        print(f"\n{latent}: best code per value (where the {latent} decides the next word: {s['tokens_next']:,} tokens, "
              f"not counting {s['tokens_next_unknown']:,} where it is not yet written in the window; all: "
              f"{s['tokens_all']:,}); {s['owned']} of {s['of']} own a code with P, R >= 0.9")
        print(f"  {'value':9s} {'code':22s} {'P':>5s} {'R':>5s} | all {'P':>5s} {'R':>5s} | dense pick {'P':>5s} {'R':>5s}"
              f" | neuron P")
        for x in s["values"]:
            d, n = x.get("dense", {}), x.get("neuron", {})
            print(f"  {x['value']:9s} {x['book'] + ':' + str(x['code']):22s} {x['P_next']:5.2f} {x['R_next']:5.2f} | "
                  f"    {x['P_all']:5.2f} {x['R_all']:5.2f} | {d.get('book', '-') + ':' + str(d.get('code', '')):>10s} "
                  f"{d.get('P_next', 0):5.2f} {d.get('R_next', 0):5.2f} | {n.get('P_next', float('nan')):8.2f}")


def story_losses(model, tokens, story, batch_size=64):
    """Mean cross-entropy (nats per token) over consecutive windows, and over the tokens whose story starts inside
    their window (the model has read its latents): (all, in_context). tokens, story: (n, T) as window_truth's; the
    token before each window is taken to end a story when story ids are not ascending from it (the first window)."""
    import torch
    import torch.nn.functional as F

    prev = torch.cat([story[:1, :1] - 1, story[:-1, -1:]])  # (n, 1) the story of the token before each window
    inside = story[:, :-1] > prev  # (n, T - 1) positions whose target's story began in the window
    dev = next(model.parameters()).device
    ce = []
    with torch.no_grad():
        for s in range(0, len(tokens), batch_size):
            x = tokens[s: s + batch_size].long().to(dev)
            logits = model(x)[0]  # (B, T, V)
            ce.append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
                      .view(len(x), -1).cpu())  # (B, T - 1)
    ce = torch.cat(ce)
    return ce.mean().item(), ce[inside].mean().item()


def report_truth(out, col, model, data_dir, batch_size=64):
    """analyze.py on a stories run: the tables of `summarize` printed and written to out/stories.json; returns the
    browser's concepts {book: {code: [("topic dragon", P, R), ...]}} (the two best by F1 where each latent decides
    the next word), or None when data_dir is not the story language."""
    from evaluate import f1
    from plumbing.tokens import load_tokens

    truth = load_truth(data_dir)
    if truth is None:
        return None
    wt = window_truth(truth, col["tokens"].long(), load_tokens(data_dir, 1, 1 << 16)[1])
    tables = code_truth(col, wt)
    summary = summarize(tables, wt, model, col["tokens"], batch_size)
    summary["loss"], summary["loss_in_context"] = story_losses(model, col["tokens"], wt["story"], batch_size)
    summary["entropy_floor"] = StoryLanguage().entropy_floor()[0]
    print(f"loss {summary['loss']:.4f} nats/token on these windows, {summary['loss_in_context']:.4f} on the tokens whose "
          f"story starts in the window; the language's entropy floor {summary['entropy_floor']:.4f}")
    print_summary(summary)
    with open(os.path.join(out, "stories.json"), "w") as f:
        json.dump(summary, f, indent=1)
    concepts = {}
    for latent, names in LATENTS.items():
        for book, (counts, P, R) in ((b, t["next"]) for b, t in tables[latent].items()):
            score = f1(P, R)  # (L, M)
            for c in (counts.sum(0) > 0).nonzero().flatten().tolist():
                concepts.setdefault(book, {}).setdefault(c, []).extend(
                    (f"{latent} {n}", P[v, c].item(), R[v, c].item(), score[v, c].item()) for v, n in enumerate(names))
    return {b: {c: [x[:3] for x in sorted(f, key=lambda x: -x[3])[:2] if x[3] > 0] for c, f in cs.items()}
            for b, cs in concepts.items()}


def save_truth(path, stories):
    """The per-token truth of a stream as an .npz (topic, mood: int8; topic_next, mood_next, topic_seen, mood_seen: bool;
    story: int32; the fields of Stories), with the names
    of the values (topics, moods). Written to a temporary name, then renamed."""
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, topic=stories.topic.astype(np.int8), mood=stories.mood.astype(np.int8),
                        topic_next=stories.topic_next, mood_next=stories.mood_next, topic_seen=stories.topic_seen,
                        mood_seen=stories.mood_seen, story=stories.story.astype(np.int32),
                        topics=np.array(TOPIC_NAMES), moods=np.array(MOOD_NAMES))
    os.replace(tmp, path)


if __name__ == "__main__":
    lang = StoryLanguage(seed=0)
    floor, h, tokens = lang.entropy_floor()
    print(f"story language: {len(TOPICS)} topics, {len(MOODS)} moods, {lang.vocab_size} tokens (words, ',', '.', EOT)")
    print(f"a story: {h:.2f} nats over {tokens:.2f} tokens (with end-of-text): entropy floor {floor:.4f} nats/token")
    s = lang.sample(3)
    for i in range(3):
        at = s.story == i
        ids = s.tokens[at]
        print(f"\n[topic {TOPIC_NAMES[s.topic[at][0]]}, mood {MOOD_NAMES[s.mood[at][0]]}] {lang.decode(ids[:-1])}")
        marks = "".join("T" if a else "M" if b else "." for a, b in zip(s.topic_next[at], s.mood_next[at]))
        print(f"  next word written by a topic (T) or mood (M) slot: {marks}")
    print("\n" + json.dumps({"topic words shared by two or more topics": sorted(
        lang.vocab[i].lstrip("Ġ") for i, t in lang.topic_words.items() if len(t) > 1)}))
