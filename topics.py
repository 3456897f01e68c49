"""
Topics in a language model (Codebook Features, Sections 5.2 and 5.3, Table 3): find the codes of a topic in the
codes a model chooses on validation text, then steer generation towards the topic by forcing them.

    python topics.py --out_dir=out-tinystories                   # the paper's topics: find codes, then steer
    python topics.py --out_dir=out-tinystories --steer=false     # find the codes only
    python topics.py --out_dir=out-tinystories --topics=dragon,sea=ocean|sea --codes_per_topic=5
    python topics.py --out_dir=out-tinystories --topics= --frequent=10   # the 10 most frequent nouns instead

A topic is a regex (TOPICS, or NAME=REGEX), matched case-insensitively on the decoded text. Its codes are found
two ways (Section 5.2): "context" codes fire near a match (within `window` tokens) more often than any other code,
ranked by precision among the codes that fire >= 10 times; "dense" codes fire on more than half the tokens of a
text, ranked by the fraction of their texts that match. Steering (Table 3): 4 prompts x `samples_per_prompt`
samples of `max_new_tokens` tokens at temperature 1, without and with the topic's best `codes_per_topic` context
codes forced (steer.py's "one" mode); success = the sample matches the topic's regex.

The paper's topics are rare in a small training set. `--frequent=N` adds the N most frequent nouns of the model's
own training text, chosen by counting alone: the words that most often follow a determiner (a, an, the, his, her,
their, my, your, its, our), past the adjectives and set phrases of NOT_TOPICS ("the little cat" counts "cat"),
plurals folded into their singular; each becomes the topic `\bword(s)?\b`.

On a run of the story language (stories.py; its dataset has val_truth.npz) every topic and mood is found and steered
against the truth instead (stories.topics_main): each value's best code by F1 where it decides the next word, steered
as above (prompts stories.PROMPTS, one story per sample) and scored by the value's regex and by the grammar, with the
other latent's change beside it, then the same with the best single MLP neuron forced; stories.json holds the tables.

Outputs in save_dir (default <out_dir>/topics, replaced as a whole when complete): topic_codes.json
({topic: ["BOOK:CODE", ...]}, best first), concepts.json (both rankings with their numbers) and steering.json
(rates and samples).
"""

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import stories
from analyze import collect_codes, precision_recall, regex_mask
from model import load_run
from plumbing.configuration import ConfigError, is_device, is_out_dir, parse_config, spec, split_list, validate
from plumbing.entry import cli
from plumbing.files import read_json
from plumbing.memory import check_topics
from plumbing.progress import progress
from plumbing.rundir import claim, staged_dir
from plumbing.tokens import lm_batches, load_tokenizer, load_tokens, vocab_strings
from steer import generate, parse_codes

TOPICS = {"dragon": "dragon", "slide": "slide", "friend": "friend", "flower": "flower", "fire": "fire",
          "baby": "baby", "princess": "prince|crown|king|castle"}  # the paper's topics (Table 3)
PROMPTS = ["", "Once upon a time,", "Once there was a", "A long time ago,"]
DETERMINERS = {"a", "an", "the", "his", "her", "their", "my", "your", "its", "our"}
NOT_TOPICS = {"little", "big", "new", "old", "best", "small", "special", "other", "good", "time", "lot", "way", "end",
              "same", "first", "next", "whole", "last", "only", "very", "most", "nice", "pretty", "happy", "beautiful",
              "there", "it", "he", "she", "they", "was", "and", "to", "of", "in", "on", "that", "with", "so", "but"}


def frequent_nouns(text, n=10):
    """The n words of `text` that most often follow a determiner (past NOT_TOPICS), plurals folded in:
    [(word, count)], most frequent first."""
    words = re.findall(r"[a-z]+", text.lower())
    after = Counter()
    for i, d in enumerate(words[:-1]):
        if d in DETERMINERS:
            j = i + 1
            while j < len(words) - 1 and words[j] in NOT_TOPICS:  # "the little cat": skip the adjectives
                j += 1
            if words[j] not in NOT_TOPICS | DETERMINERS:
                after[words[j]] += 1
    for w in list(after):
        if w.endswith("s") and w[:-1] in after:
            after[w[:-1]] += after.pop(w)
    return after.most_common(n)


def parse_topics(text):
    """"dragon,princess,sea=ocean|sea" -> {name: regex}, names from TOPICS unless given as NAME=REGEX.
    Raises ConfigError for an unknown name or a bad regex."""
    out = {}
    for item in split_list(text):
        name, _, regex = item.partition("=")
        if not regex and name not in TOPICS:
            raise ConfigError(f"unknown topic {name!r}: use one of {', '.join(TOPICS)} or NAME=REGEX")
        try:
            re.compile(regex or TOPICS[name])
        except re.error as e:
            raise ConfigError(f"topic {name}={regex!r} is not a valid regular expression ({e}): fix it") from None
        out[name] = regex or TOPICS[name]
    return out


@dataclass
class TopicsConfig:
    """Topic codes and topic steering. Defaults: the paper's topics and protocol."""

    out_dir: str = "out-tinystories"  # the language-model run whose ckpt.pt is read
    save_dir: Optional[str] = spec(None, check=is_out_dir)  # None = <out_dir>/topics
    dataset: Optional[str] = None  # a data/prepare.py directory; None = the checkpoint's
    topics: str = spec(",".join(TOPICS), check=parse_topics)  # names from TOPICS or NAME=REGEX, comma-separated
    frequent: int = spec(0, ">= 0")  # also the N most frequent nouns of the training text (module docstring)
    topic_codes: str = ""  # a topic_codes.json to steer with instead of finding the codes
    max_tokens: int = spec(200_000, ">= 1")  # tokens of consecutive val windows to read codes on
    batch_size: int = spec(64, ">= 1")  # windows per forward (fewer when the logits would pass 256 MiB)
    window: int = spec(16, ">= 0")  # a "context" code fires within this many tokens of a match
    top: int = spec(5, ">= 1")  # codes kept per topic and ranking
    steer: bool = True  # generate without and with each topic's codes forced
    codes_per_topic: int = spec(1, ">= 1")  # force the topic's best N codes (Table 3: one)
    mode: str = spec("one", ("one", "all"))  # steer.py's forcing mode
    samples_per_prompt: int = spec(10, ">= 1")
    max_new_tokens: int = spec(200, ">= 1")
    temperature: float = spec(1.0, ">= 0")
    seed: int = spec(1337, ">= 0")
    device: str = spec("auto", check=is_device)

    def __post_init__(self):
        validate(self)
        self.save_dir = self.save_dir or os.path.join(self.out_dir, "topics")
        claim(self.save_dir, "topics", "save_dir")  # before any work: no other kind, no user's folder


def dense_codes(codes, num_codes, frac=0.5):
    """Codes that fire on more than `frac` of the tokens of each text. codes: (n, T, k) -> (n, M) bool."""
    n, T, k = codes.shape
    c = codes.long().reshape(n, -1)
    counts = torch.zeros(n, num_codes + 1, dtype=torch.long).scatter_add_(1, c.clamp(min=-1) + 1, torch.ones_like(c))
    return counts[:, 1:] > frac * T


def topic_codes(col, tok, regex, window=16, top=5, min_count=10, what=None):
    """A topic's codes, both rankings of the module docstring, over the collected codes `col` (analyze.collect_codes
    with col["books"]) decoded by tok(id) -> str. what: the topic's name for the ConfigError when nothing matches.
    Returns {"context": [(book, code, precision, count)], "dense": [(book, code, precision, texts)]}, best first."""
    hit = regex_mask(col["tokens"], tok, regex, what)  # (n, T)
    window = min(window, hit.shape[1])  # a wider window is the whole text, and max_pool1d walks every position of it
    near = F.max_pool1d(hit.float().unsqueeze(1), 2 * window + 1, stride=1, padding=window).squeeze(1) > 0
    topical = hit.any(1)  # (n,) texts that match
    ctx, dense = [], []
    for book, name, g, cb in col["books"]:
        codes = col["codes"][name][:, :, g]  # (n, T, k)
        counts, P, _ = precision_recall(codes.reshape(-1, cb.k), near.reshape(-1).long(), 2, cb.num_codes)
        fired = counts.sum(0)
        for c in (P[1] * (fired >= min_count)).topk(min(top, cb.num_codes)).indices.tolist():
            if fired[c] >= min_count:
                ctx.append((book, c, P[1, c].item(), int(fired[c])))
        d = dense_codes(codes, cb.num_codes)  # (n, M)
        texts = d.sum(0)
        prec = (d & topical.unsqueeze(1)).sum(0) / texts.clamp(min=1)
        for c in (prec * (texts > 0)).topk(min(top, cb.num_codes)).indices.tolist():
            if texts[c] > 0:
                dense.append((book, c, prec[c].item(), int(texts[c])))
    best = lambda x: (-x[2], -x[3])  # noqa: E731
    return {"context": sorted(ctx, key=best)[:top], "dense": sorted(dense, key=best)[:top]}


def topic_steering(model, codec, topic_codes, topics, per_prompt=10, max_new_tokens=200, temperature=1.0, seed=0,
                   mode="one", prompts=PROMPTS):
    """Per topic, the fraction of samples whose text matches the topic regex, without and with its codes forced.

    Args:
        codec: has encode(list[str]) -> list[list[int]], decode(list[int]) -> str and eot (tokens.Codec).
        topic_codes: {topic: [(codebook, group, code)]}; topics: {topic: regex} (matched case-insensitively).
    Returns:
        {topic: {"baseline": rate, "steered": rate, "codes": n}} and the samples {topic or "baseline": [text]}.
    """
    def sample(force):
        texts = []
        for i, p in enumerate(prompts):
            prompt = [codec.eot] + (codec.encode([p])[0] if p else [])
            out = generate(model, prompt, per_prompt, max_new_tokens, temperature, seed + i, force=force, mode=mode)
            texts += [codec.decode(row[1:]) for row in out.tolist()]
        return texts

    samples, res = {"baseline": sample(())}, {}
    for topic, regex in progress(topics.items(), len(topics), "steering"):
        pat = re.compile(regex, re.I)
        samples[topic] = sample(topic_codes.get(topic, ()))
        rate = lambda texts: sum(bool(pat.search(t)) for t in texts) / len(texts)  # noqa: E731
        res[topic] = {"baseline": rate(samples["baseline"]), "steered": rate(samples[topic]),
                      "codes": len(topic_codes.get(topic, ()))}
    return res, samples


def find(cfg, ckpt, model, codec, topics):
    """{topic: topic_codes(...)} on the run's validation text."""
    T, V = model.config.block_size, model.config.vocab_size
    val = load_tokens(cfg.dataset or ckpt["train_config"]["dataset"], T, V)[1]
    rows = max(1, min(cfg.batch_size, 2**26 // (T * V)))  # logits <= 256 MiB
    col = collect_codes(model, [x for x, _ in lm_batches(val, T, cfg.max_tokens, rows)], model.lm_head.weight.device)
    col["books"], tok = model.books(), vocab_strings(codec)
    found = {}
    for name, regex in topics.items():
        found[name] = topic_codes(col, tok, regex, cfg.window, cfg.top, what=f"topic {name} ({regex!r})")
        print(f"{name} ({regex!r}): context codes " + ", ".join(f"{b}:{c} (P {p:.2f}, fires {n})"
                                                              for b, c, p, n in found[name]["context"]))
    return found


def main(argv):
    cfg = parse_config(argv, TopicsConfig)
    ckpt, model = load_run(cfg.out_dir, cfg.device)
    if ckpt["train_config"].get("dataset", "fsm") == "fsm" or not model.codebooks():
        raise ConfigError(f"{cfg.out_dir} is not a language model with codebooks: point out_dir at one "
                          "(analyze.py and steer.py read TokFSM runs)")
    data = cfg.dataset or ckpt["train_config"]["dataset"]
    codec = load_tokenizer(data)[0]
    check_topics(cfg, model.config, data, cfg.device)  # sizes that cannot fit stop here
    if stories.load_truth(data) is not None:  # the story language: every topic and mood, scored against its truth
        return stories.topics_main(cfg, model, data)
    topics = parse_topics(cfg.topics)
    if cfg.frequent:  # counted on the training text, before any steering
        train = load_tokens(data, model.config.block_size, model.config.vocab_size)[0]
        nouns = frequent_nouns(codec.decode(train.tolist()), cfg.frequent)
        print("most frequent nouns of the training text: " + ", ".join(f"{w} ({c})" for w, c in nouns))
        topics.update({w: rf"\b{w}s?\b" for w, _ in nouns})
    if not topics:
        raise ConfigError("no topics: pass --topics=NAMES or --frequent=N")
    if cfg.topic_codes:
        found = read_json(cfg.topic_codes, "topic codes", "write it again with topics.py")
        if not all(isinstance(c, list) and all(isinstance(x, str) for x in c) for c in found.values()):
            raise ConfigError(f"{cfg.topic_codes} must map topics to lists of \"BOOK:CODE\": write it again with "
                              "topics.py")
        named = found
    else:
        found = find(cfg, ckpt, model, codec, topics)
        named = {t: [f"{b}:{c}" for b, c, _, _ in f["context"]] for t, f in found.items()}
    chosen = {t: ",".join(named.get(t, [])[: cfg.codes_per_topic]) for t in topics}  # each topic's best codes
    res, samples = {}, {}
    if cfg.steer:
        codes = {t: parse_codes(model, chosen[t]) for t in topics}
        res, samples = topic_steering(model, codec, codes, topics, cfg.samples_per_prompt, cfg.max_new_tokens,
                                      cfg.temperature, cfg.seed, cfg.mode)
        print(f"  {'topic':10s} {'baseline':>9s} {'steered':>8s}  code")
        for t, r in res.items():
            print(f"  {t:10s} {100 * r['baseline']:8.1f}% {100 * r['steered']:7.1f}%  {chosen[t] or '-'}")
    with staged_dir(cfg.save_dir, "topics") as out:
        steering = {"results": res, "samples": samples}
        for name, obj in (("topic_codes", named), ("concepts", found), ("steering", steering)):
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(obj, f, indent=1)
    print(f"wrote {cfg.save_dir}: topic_codes.json, concepts.json, steering.json")


if __name__ == "__main__":
    cli(main)
