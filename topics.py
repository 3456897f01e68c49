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
against the truth instead (stories_main below): each value's best code by F1 where it decides the next word, steered
as above (prompts stories.PROMPTS, one story per sample) and scored by the value's regex and by the grammar, with the
other latent's change beside it, then the same with the best single MLP neuron forced; stories.json holds the tables.

Outputs in save_dir (default <out_dir>/topics, replaced as a whole when complete): topic_codes.json
({topic: ["BOOK:CODE", ...]}, best first), concepts.json (both rankings with their numbers) and steering.json
(rates and samples).
"""

from plumbing.entry import cli  # first: a Ctrl-C while torch loads is one line (plumbing/__init__)
import json
import os
import re
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import stories
from analyze import collect_codes, f1, precision_recall, regex_mask
from model import load_run
from plumbing.configuration import ConfigError, is_device, is_out_dir, parse_config, spec, split_list, validate
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


# ---------------------------------------------------------------------------------------------- the story language
def steer_latents(model, lang, chosen, per_prompt=10, max_new_tokens=90, temperature=1.0, seed=0, mode="one",
                  prompts=stories.PROMPTS):
    """Table 3's protocol on the story language: per target, 4 prompts x per_prompt samples at `temperature`,
    without and with its codes forced at every prompt and generated token (steer.generate, mode "one" or "all"),
    each sample read up to its first end-of-text token (one story), scored twice.

    Args:
        chosen: {(latent, value index): [(codebook, group, code)], or a function returning a context manager within
            which the model is steered (e.g. forced_neuron)}; lang: a stories.StoryLanguage.
    Returns:
        ({"topic dragon": {"regex": (baseline, steered), "truth": (baseline, steered), "other_kept": paired fraction,
        "other_tv": total variation, "n": samples}}, {"baseline" or target: [text]}). regex: the sample matches
        stories.regex_of(latent, value); truth: lang.latent_of_text gives the sample the value; other_kept: among the
        samples whose other latent is defined with and without forcing, the fraction where it is the same (the same
        seed and row, so the same random draws: forcing that leaves the other latent alone keeps it); other_tv: total variation
        between the other latent's distributions with and without forcing (-1, undefined, counts as a value).
    """
    def sample(force):
        out = []
        for i, p in enumerate(prompts):
            prompt = [lang.eot] + (lang.encode(p) if p else [])
            with force() if callable(force) else nullcontext():
                rows = generate(model, prompt, per_prompt, max_new_tokens, temperature, seed + i,
                                force=() if callable(force) else force, mode=mode)
            for row in rows[:, 1:].tolist():  # (n, len(prompt) - 1 + max_new_tokens)
                gen = row[len(prompt) - 1:]
                out.append(row[: len(prompt) - 1 + (gen.index(lang.eot) if lang.eot in gen else len(gen))])
        return out

    base = sample(())
    base_lat = np.array([lang.latent_of_text(x)[:2] for x in base])  # (n, 2) topic, mood; -1 undefined
    samples, res = {"baseline": [lang.decode(x) for x in base]}, {}
    for (latent, v), force in chosen.items():
        ids = sample(force)
        lat = np.array([lang.latent_of_text(x)[:2] for x in ids])
        j, o = (0, 1) if latent == "topic" else (1, 0)
        pat = re.compile(stories.regex_of(latent, v))
        texts = [lang.decode(x) for x in ids]
        both = (lat[:, o] >= 0) & (base_lat[:, o] >= 0)
        n_other = len(stories.LATENTS["topic" if o == 0 else "mood"])
        hist = lambda a: np.bincount(a + 1, minlength=n_other + 1) / len(a)  # noqa: E731
        name = f"{latent} {stories.LATENTS[latent][v]}"
        res[name] = {"regex": (float(np.mean([bool(pat.search(t)) for t in samples["baseline"]])),
                               float(np.mean([bool(pat.search(t)) for t in texts]))),
                     "truth": (float(np.mean(base_lat[:, j] == v)), float(np.mean(lat[:, j] == v))),
                     "other_kept": float(np.mean(lat[both, o] == base_lat[both, o])) if both.any() else float("nan"),
                     "other_tv": float(0.5 * np.abs(hist(lat[:, o]) - hist(base_lat[:, o])).sum()), "n": len(ids)}
        samples[name] = texts
    return res, samples


@contextmanager
def forced_neuron(model, layer, neuron, value):
    """Within the block, MLP neuron `neuron` of layer `layer` (after the GELU, as evaluate.mlp_neurons reads it) is
    set to `value` at every token: the single-neuron counterpart of forcing a code."""
    def hook(module, inputs, output):
        output = output.clone()
        output[..., neuron] = value
        return output

    handle = model.transformer.h[layer].mlp.gelu.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def print_steering(res, codes):
    """Table 3's shape: per target, its code and the rates without and with it forced, by regex and by truth."""
    print(f"\n  {'target':16s} {'code':22s} {'regex':>15s} {'truth':>15s}  other latent kept (paired), TV")
    for name, r in ((n, r) for n, r in res.items() if n != "neurons"):
        print(f"  {name:16s} {codes.get(name, '-'):22s} {100 * r['regex'][0]:5.1f}% -> {100 * r['regex'][1]:5.1f}% "
              f"{100 * r['truth'][0]:5.1f}% -> {100 * r['truth'][1]:5.1f}%  {100 * r['other_kept']:5.1f}%, "
              f"{r['other_tv']:.2f}")
    for latent in stories.LATENTS:
        rows = [r for n, r in res.items() if n.startswith(latent + " ")]
        if rows:
            print(f"  mean over {len(rows)} {latent} values: regex {100 * np.mean([r['regex'][1] for r in rows]):.1f}%, "
                  f"truth {100 * np.mean([r['truth'][1] for r in rows]):.1f}% (baseline "
                  f"{100 * np.mean([r['truth'][0] for r in rows]):.1f}%), other latent kept "
                  f"{100 * np.nanmean([r['other_kept'] for r in rows]):.1f}%")


def stories_main(cfg, model, data_dir):
    """topics.py on a stories run: every code against the truth, each topic's and mood's best codes (by F1 where it
    decides the next word; or --topic_codes), steered by `steer_latents`; outputs as topics.py's (module docstring
    there) plus stories.json (the code tables)."""
    lang, T = stories.StoryLanguage(), model.config.block_size
    val = load_tokens(data_dir, T, model.config.vocab_size)[1]
    rows = max(1, min(cfg.batch_size, 2**26 // (T * model.config.vocab_size)))
    batches = [x for x, _ in lm_batches(val, T, cfg.max_tokens, rows)]
    col = collect_codes(model, batches, next(model.parameters()).device)
    col["books"] = model.books()
    wt = stories.window_truth(stories.load_truth(data_dir), col["tokens"].long(), val)
    tables = stories.code_truth(col, wt)
    summary = stories.summarize(tables, wt, model, col["tokens"], cfg.batch_size)
    stories.print_summary(summary)
    if cfg.topic_codes:
        named = read_json(cfg.topic_codes, "topic codes", "write it again with topics.py")
    else:  # each value's best codes by F1, over every book
        named = {}
        for latent, names in stories.LATENTS.items():
            for v, n in enumerate(names):
                scored = [(f1(t["next"][1][v], t["next"][2][v])[c].item(), f"{b}:{c}") for b, t in tables[latent].items()
                          for c in range(t["next"][1].shape[1])]
                named[f"{latent} {n}"] = [x for _, x in sorted(scored, reverse=True)[: cfg.codes_per_topic]]
    chosen = {}
    for latent, names in stories.LATENTS.items():
        for v, n in enumerate(names):
            codes = named.get(f"{latent} {n}")
            if not isinstance(codes, list) or not all(isinstance(x, str) for x in codes):
                raise ConfigError(f"{cfg.topic_codes}: no list of \"BOOK:CODE\" for {latent} {n!r}: write it again")
            chosen[(latent, v)] = parse_codes(model, ",".join(codes[: cfg.codes_per_topic]))
    res, samples = {}, {}
    if cfg.steer:
        res, samples = steer_latents(model, lang, chosen, cfg.samples_per_prompt, min(cfg.max_new_tokens,
                                     lang.max_story_tokens()), cfg.temperature, cfg.seed, cfg.mode)
        print_steering(res, {k: ",".join(v[: cfg.codes_per_topic]) for k, v in named.items()})
        neurons = {(latent, v): (lambda n=x["neuron"]: forced_neuron(model, n["layer"], n["index"], n["max"]))
                   for latent in stories.LATENTS for v, x in enumerate(summary[latent]["values"])}
        res["neurons"], samples["neurons"] = steer_latents(model, lang, neurons, cfg.samples_per_prompt, min(
            cfg.max_new_tokens, lang.max_story_tokens()), cfg.temperature, cfg.seed, cfg.mode)
        print("\nthe best single MLP neuron of each value (at its code's recall) forced to its largest activation:")
        print_steering(res["neurons"], {f"{latent} {x['value']}": f"h.{x['neuron']['layer']}.mlp neuron "
                                        f"{x['neuron']['index']}" for latent in stories.LATENTS
                                        for x in summary[latent]["values"]})
    write_json(cfg.save_dir, {"topic_codes": named, "stories": summary,
                              "steering": {"results": res, "samples": samples}})


def write_json(save_dir, outputs):
    """Write {name: object} as save_dir/<name>.json, the directory replaced as a whole (rundir.staged_dir)."""
    with staged_dir(save_dir, "topics") as out:
        for name, obj in outputs.items():
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(obj, f, indent=1)
    print(f"wrote {save_dir}: " + ", ".join(f"{name}.json" for name in outputs))


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
        return stories_main(cfg, model, data)
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
    write_json(cfg.save_dir, {"topic_codes": named, "concepts": found,
                              "steering": {"results": res, "samples": samples}})


if __name__ == "__main__":
    cli(main)
