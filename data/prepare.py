"""
Tokenize TinyStories or WikiText-103 (or write the generated story language of stories.py) into flat uint16 token
files for train.py's language-model path (Codebook Features, Section 5: 1-layer TinyStories models, and Pythia
finetuned on WikiText-103).

    python data/prepare.py tinystories   # downloads TinyStories-{train,valid}.txt (HF roneneldan/TinyStories)
    python data/prepare.py wikitext      # downloads wikitext-103-v1 (HF `datasets` if installed, else the zip)
    python data/prepare.py pythia --model=EleutherAI/pythia-70m-deduped   # weights for train.py --init_from
    python data/prepare.py stories       # the generated story language (stories.py), offline, in seconds

From local files, offline, e.g. the copies in ../shared/data (run from the repository root):

    python data/prepare.py tinystories --train=../shared/data/tinystories/tinystories_train_head.txt \\
        --val=../shared/data/tinystories/tinystories_valid_head.txt \\
        --tokenizer=../shared/data/tokenizers/gpt2/r50k_base.tiktoken
    python data/prepare.py wikitext --valid=../shared/data/wikitext/wikitext-103/wiki.valid.tokens \\
        --test=../shared/data/wikitext/wikitext-103/wiki.test.tokens \\
        --tokenizer=../shared/data/tokenizers/gpt-neox/tokenizer.json

Output in --out (default data/<dataset>): train.bin, val.bin (and test.bin for wikitext), each a flat array
of uint16 token ids (np.memmap(path, dtype=np.uint16, mode="r")) in which every document is followed by
the end-of-text token; a copy of the tokenizer file (tokenizer.tiktoken or tokenizer.json), so sample.py
decodes offline; and meta.json (tokenizer, vocab_size, eot_token, token and document counts, sources),
written last: a directory with meta.json is complete.

Tokenizers: TinyStories uses GPT-2 BPE (tiktoken r50k_base: 50,257 tokens, eot 50256), as the
roneneldan/TinyStories-* models do; WikiText uses Pythia's GPT-NeoX-20B BPE (HF `tokenizers`: 50,277
tokens, eos 0), since the wikitext preset finetunes Pythia. --tokenizer takes a local file (a Pythia
download's tokenizer.json works); without it the file is downloaded.

Documents:
- TinyStories. The HF files separate stories with `<|endoftext|>`: we split on it. Files without
  it (the heads in ../shared/data) are split by rule: a story starts (a) at a non-empty line that directly
  follows another non-empty line (the train head joins stories with "\\n", paragraphs with "\\n\\n"), or
  (b) at a paragraph that begins "Once upon a time" (the valid head ends stories and paragraphs alike with
  "\\n\\n"; no paragraph inside a train-head story begins so). Rule (a) also cuts the few stories that
  break lines with a single "\\n", and (b) misses stories that open otherwise, which then run together:
  either way only an end-of-text token is misplaced. Stories are stripped of outer whitespace.
- WikiText-103. An article starts at a top-level title line ` = Title = ` (exactly one '=' on each side)
  and is kept byte for byte (text before the first title joins the first article). Given a train file (as
  downloaded), the splits are train/valid/test as published. Given only --valid and --test (the shared
  copies), valid is split by article: every 10th article (the 10th, 20th, ...) goes to val, the other 90%
  to train; test stays test.

`stories` writes stories of the generated language (stories.py; --train_stories, --val_stories, --seed): its
word-level tokenizer.json (the "neox" kind), train.bin and val.bin as above, and val_truth.npz, the truth of every
val token (np.load: topic, mood int8 per token, indices into its arrays `topics` and `moods`; topic_next, mood_next
bool: the next token is written by a topic or a mood slot), aligned with val.bin token for token. Train and val are
drawn from the seeds (seed, 0) and (seed, 1) of numpy's generator, so they differ.

`pythia` fetches config.json, the weights (model.safetensors, else pytorch_model.bin) and tokenizer.json of a
Hugging Face GPT-NeoX repo into --out (default data/<name>, e.g. data/pythia-70m-deduped), the directory that
`train.py --init_from=DIR` and `GPT.from_pythia(DIR)` read; huggingface_hub if installed, else urllib.

Errors (a missing file, a failed download, a tokenizer that is not r50k_base) stop with one line.
"""

import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from plumbing.configuration import (ConfigError, check_help, is_out_dir, parse_args, read_text, spec,  # noqa: E402
                                    validate)
from plumbing.entry import cli  # noqa: E402
from plumbing.files import atomic_write  # noqa: E402
from plumbing.progress import progress  # noqa: E402
from plumbing.rundir import claim, mark, staged_dir  # noqa: E402
from plumbing.tokens import EOT, GPT2_SHA256, load_codec  # noqa: E402

GPT2_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
NEOX_REPO = "EleutherAI/pythia-70m"  # every Pythia ships the same GPT-NeoX-20B tokenizer.json
TINYSTORIES_REPO = "roneneldan/TinyStories"
TINYSTORIES_FILES = {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"}
WIKITEXT_ZIP = "https://wikitext.smerity.com/wikitext-103-v1.zip"  # the original release, as HF's builder used
TITLE = re.compile(r"^(?= = [^=\n].* = $)", re.M)  # the start of a top-level title line ` = Title = `
VAL_EVERY = 10  # WikiText without a train file: every 10th article of valid goes to val


# ---------------------------------------------------------------------------------------------- downloads
def _offline(what, e, hint):
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    return f"could not download {what} ({type(e).__name__}: {reason}): offline? pass local files, {hint}"


def fetch(url, dest, hint):
    """Download url to dest with urllib (skipped if dest exists). Raises ConfigError when it fails."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    print(f"downloading {url}")
    try:
        if os.environ.get("HF_HUB_OFFLINE") == "1" and "huggingface.co" in url:
            raise ConnectionError("HF_HUB_OFFLINE=1")
        with urllib.request.urlopen(url, timeout=60) as r, open(dest + ".part", "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (OSError, ConnectionError) as e:  # URLError and timeouts are OSErrors
        raise ConfigError(_offline(url, e, hint)) from None
    os.replace(dest + ".part", dest)
    return dest


def hf_file(repo, filename, repo_type, out_dir=None, hint="see data/prepare.py's docstring"):
    """Local path of a file of a HF hub repo: huggingface_hub's cache if it is installed, else urllib into
    out_dir (default: the temp dir)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        url = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}/resolve/main/{filename}"
        import tempfile

        return fetch(url, os.path.join(out_dir or tempfile.gettempdir(), filename), hint)
    try:
        return hf_hub_download(repo, filename, repo_type=repo_type)
    except Exception as e:  # offline, gated, renamed: the hub raises many kinds
        raise ConfigError(_offline(f"{repo}/{filename}", e, hint)) from None


def wikitext_download(raw):
    """wiki.{train,valid,test}.tokens of wikitext-103-v1 in raw/: HF `datasets` if installed, else the zip."""
    paths = {s: os.path.join(raw, f"wiki.{s}.tokens") for s in ("train", "valid", "test")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    hint = "--valid=wiki.valid.tokens --test=wiki.test.tokens [--train=wiki.train.tokens]"
    os.makedirs(raw, exist_ok=True)
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-v1")
        except Exception as e:
            raise ConfigError(_offline("HF wikitext/wikitext-103-v1", e, hint)) from None
        for split, s in (("train", "train"), ("validation", "valid"), ("test", "test")):
            with atomic_write(paths[s]) as f:  # HF rows are the file's lines; blank " " lines are ""
                f.writelines(row if row else " \n" for row in ds[split]["text"])
        return paths
    archive = fetch(WIKITEXT_ZIP, os.path.join(raw, "wikitext-103-v1.zip"), hint)
    with zipfile.ZipFile(archive) as z:
        for s, p in paths.items():
            with z.open(f"wikitext-103/wiki.{s}.tokens") as src, atomic_write(p, "wb") as dst:  # whole or not at all
                shutil.copyfileobj(src, dst)
    return paths


def pythia_download(repo, out):
    """config.json, weights and tokenizer.json of the HF repo (e.g. EleutherAI/pythia-70m-deduped) in out/.
    Returns out. Files already in out/ are kept. Raises ConfigError when a download fails (offline, no
    such repo, or neither model.safetensors nor pytorch_model.bin)."""
    os.makedirs(out, exist_ok=True)
    hint = f"or copy a download of {repo} (config.json, model.safetensors, tokenizer.json) into {out}"

    def get(name):  # into out/name, atomically
        dest = os.path.join(out, name)
        if not os.path.exists(dest):
            src = hf_file(repo, name, "model", out, hint)
            if os.path.abspath(src) != os.path.abspath(dest):
                shutil.copy(src, dest + ".part")
                os.replace(dest + ".part", dest)

    get("config.json")
    get("tokenizer.json")
    if not any(os.path.exists(os.path.join(out, w)) for w in ("model.safetensors", "pytorch_model.bin")):
        try:
            get("model.safetensors")
        except ConfigError:  # older repos ship only the pickle
            get("pytorch_model.bin")
    return out

# ---------------------------------------------------------------------------------------------- documents
def tinystories_docs(path):
    """Yield the stories of a TinyStories text file (see the module docstring for the rule), stripped."""
    with open(path, encoding="utf-8") as f:
        marked = EOT in f.read(1 << 20)
        f.seek(0)
        if marked:  # the HF files: split on the marker, reading 16 MB at a time
            rest = ""
            for chunk in iter(lambda: f.read(1 << 24), ""):
                *docs, rest = (rest + chunk).split(EOT)
                yield from (d.strip() for d in docs if d.strip())
            if rest.strip():
                yield rest.strip()
            return
        lines, has_text, prev = [], False, ""
        for line in f:
            line = line.rstrip("\n")
            starts = line.strip() and (prev.strip() or line.startswith("Once upon a time"))
            if starts and has_text:
                yield "\n".join(lines).strip()
                lines, has_text = [], False
            lines.append(line)
            has_text = has_text or bool(line.strip())
            prev = line
        if has_text:
            yield "\n".join(lines).strip()


def wikitext_articles(path):
    """The articles of a WikiText .tokens file, each from its ` = Title = ` line: "".join(them) is the file."""
    text = read_text(path, "WikiText file")
    first, *rest = TITLE.split(text)
    if not rest:
        return [first] if first else []
    rest[0] = first + rest[0]
    return rest


def batched(it, n):
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def write_tokens(docs, codec, path, batch=1024):
    """Tokenize documents (an iterable of str) `batch` at a time, each followed by eot, into a flat uint16
    file. Returns (tokens, documents)."""
    tokens = n_docs = 0
    with open(path, "wb") as f:
        for chunk in batched(progress(docs, desc=f"{os.path.basename(path)} (documents)"), batch):
            ids = codec.encode(chunk)
            arr = np.concatenate([np.array(i + [codec.eot], dtype=np.uint16) for i in ids])  # (tokens,)
            arr.tofile(f)
            tokens, n_docs = tokens + arr.size, n_docs + len(chunk)
    return tokens, n_docs


def tokenizer_file(name, path, downloads):
    """A local tokenizer file: `path`, or (None) the download cached in `downloads`. gpt2 files must be r50k_base."""
    if path is None and name == "gpt2":
        path = fetch(GPT2_URL, os.path.join(downloads, "r50k_base.tiktoken"), "--tokenizer=r50k_base.tiktoken")
    elif path is None:
        path = hf_file(NEOX_REPO, "tokenizer.json", "model", downloads, "--tokenizer=tokenizer.json")
    if name == "gpt2":
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != GPT2_SHA256:
                raise ConfigError(f"--tokenizer={path} is not r50k_base.tiktoken (its sha256 differs from tiktoken's): "
                                  "pass the GPT-2 BPE file")
    return path


# ---------------------------------------------------------------------------------------------- main
DATASETS = ("tinystories", "wikitext", "pythia", "stories")


def _is_file(path):
    return None if os.path.isfile(path) else "is not a file: check the path"


@dataclass
class PrepareConfig:
    """The flags of `python data/prepare.py DATASET --key=value ...`; every path is optional."""

    train: Optional[str] = spec(None, check=_is_file)  # a local train text file (both datasets)
    val: Optional[str] = spec(None, check=_is_file)  # tinystories: a local validation text file
    valid: Optional[str] = spec(None, check=_is_file)  # wikitext: a local wiki.valid.tokens
    test: Optional[str] = spec(None, check=_is_file)  # wikitext: a local wiki.test.tokens
    tokenizer: Optional[str] = spec(None, check=_is_file)  # r50k_base.tiktoken (tinystories), tokenizer.json (wikitext)
    model: str = ""  # pythia: a HF repo, e.g. EleutherAI/pythia-70m-deduped
    out: Optional[str] = spec(None, check=is_out_dir)  # default data/<dataset>, or data/<model name> for pythia
    train_stories: int = spec(50_000, ">= 1")  # stories: stories in train.bin (~63 tokens each)
    val_stories: int = spec(2_000, ">= 1")  # stories: stories in val.bin
    seed: int = spec(0, ">= 0")  # stories: seed of the generator

    def __post_init__(self):
        validate(self)


def sources_of(dataset, args, downloads):
    """{split: text file} of the dataset, local or downloaded, after checking which flags go together."""
    if dataset == "tinystories":
        if args.valid or args.test:
            raise ConfigError("tinystories takes --train and --val (--valid/--test are for wikitext)")
        if (args.train is None) != (args.val is None):
            raise ConfigError("give both --train and --val, or neither to download TinyStories")
        if args.train is not None:
            return {"train": args.train, "val": args.val}
        hint = "--train=TinyStories-train.txt --val=TinyStories-valid.txt"
        return {s: hf_file(TINYSTORIES_REPO, f, "dataset", downloads, hint) for s, f in TINYSTORIES_FILES.items()}
    if args.val:
        raise ConfigError("wikitext takes --valid and --test (and optionally --train); --val is for tinystories")
    if args.train is None and args.valid is None and args.test is None:
        return wikitext_download(downloads)
    if args.valid is None or args.test is None:
        raise ConfigError("give --valid and --test (and optionally --train), or none of them to download")
    return {s: getattr(args, s) for s in ("train", "valid", "test") if getattr(args, s)}


def documents(dataset, sources):
    """({split: iterable of documents}, how the splits were made)."""
    if dataset == "tinystories":
        return {s: tinystories_docs(p) for s, p in sources.items()}, \
            "stories end at <|endoftext|> lines, else by the line rule in data/prepare.py"
    arts = {s: wikitext_articles(p) for s, p in sources.items()}
    if "train" in arts:
        return {"train": arts["train"], "val": arts["valid"], "test": arts["test"]}, \
            "as published: train, valid -> val, test"
    valid = arts["valid"]
    if len(valid) < VAL_EVERY:
        raise ConfigError(f"{sources['valid']} holds {len(valid)} article(s): need >= {VAL_EVERY} to split off val")
    return {"train": [a for i, a in enumerate(valid) if i % VAL_EVERY != VAL_EVERY - 1],
            "val": valid[VAL_EVERY - 1 :: VAL_EVERY], "test": arts["test"]}, \
        f"no train file: articles of valid, every {VAL_EVERY}th -> val, the rest -> train; test -> test"


def prepare(dataset, args):
    """Tokenize one dataset into args.out as a whole (a staged directory renamed into place when complete, so a
    failure leaves an earlier dataset untouched); returns meta (also in args.out/meta.json)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if dataset == "pythia":
        if not args.model:
            raise ConfigError("pythia needs --model=REPO, e.g. --model=EleutherAI/pythia-70m-deduped")
        out = args.out or os.path.join(here, args.model.rstrip("/").split("/")[-1])
        claim(out, "pythia", "out")
        print(f"{args.model} -> {pythia_download(args.model, out)}")
        mark(out, "pythia")
        return None
    if args.model:
        raise ConfigError("--model is for `pythia`; tinystories and wikitext take text files")
    out = args.out or os.path.join(here, dataset)
    claim(out, "dataset", "out")  # before any download: no other kind, no user's folder
    if dataset == "stories":
        return prepare_stories(args, out)
    downloads = os.path.join(os.path.dirname(os.path.abspath(out)), "downloads")  # kept across runs
    sources = sources_of(dataset, args, downloads)
    name = "gpt2" if dataset == "tinystories" else "neox"
    tok = tokenizer_file(name, args.tokenizer, downloads)
    codec = load_codec(name, tok)
    docs, split = documents(dataset, sources)
    if dataset == "wikitext":
        sources = {"train": sources.get("train", sources["valid"]), "val": sources["valid"], "test": sources["test"]}
    with staged_dir(out, "dataset") as tmp:
        tok_file = "tokenizer.tiktoken" if name == "gpt2" else "tokenizer.json"
        shutil.copyfile(tok, os.path.join(tmp, tok_file))
        meta = dict(dataset=dataset, tokenizer=name, tokenizer_file=tok_file, vocab_size=codec.vocab_size,
                    eot_token=codec.eot, dtype="uint16", tokens={}, documents={}, split=split,
                    sources={s: os.path.abspath(p) for s, p in sources.items()})
        for s, d in docs.items():
            try:
                n_tok, n_doc = write_tokens(d, codec, os.path.join(tmp, f"{s}.bin"))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{sources[s]} is not UTF-8 text (byte {e.start}): convert it or pass another "
                                  "file") from None
            if n_doc == 0:  # an empty or blank file: a dataset without text would only fail later
                raise ConfigError(f"{sources[s]} holds no text, so {s}.bin would hold no tokens: pass a file with "
                                  f"{'stories' if dataset == 'tinystories' else 'articles'}")
            meta["tokens"][s], meta["documents"][s] = n_tok, n_doc
            print(f"{s}: {n_doc:,} documents, {n_tok:,} tokens -> {os.path.join(out, s + '.bin')}")
        with atomic_write(os.path.join(tmp, "meta.json")) as f:
            json.dump(meta, f, indent=2)
    return meta


def prepare_stories(args, out):
    """The generated story language into out (see the module docstring); returns meta."""
    if any(getattr(args, f) for f in ("train", "val", "valid", "test", "tokenizer")):
        raise ConfigError("stories are generated: drop --train/--val/--valid/--test/--tokenizer (use --train_stories, "
                          "--val_stories, --seed)")
    from stories import StoryLanguage, save_truth

    lang = StoryLanguage(args.seed)
    with staged_dir(out, "dataset") as tmp:
        with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
            f.write(lang.tokenizer_json())
        meta = dict(dataset="stories", tokenizer="neox", tokenizer_file="tokenizer.json", vocab_size=lang.vocab_size,
                    eot_token=lang.eot, dtype="uint16", tokens={}, documents={}, seed=args.seed,
                    entropy_floor=lang.entropy_floor()[0], truth="val_truth.npz",
                    split=f"generated: train from seed ({args.seed}, 0), val from ({args.seed}, 1)")
        for i, (s, n) in enumerate((("train", args.train_stories), ("val", args.val_stories))):
            st = lang.sample(n, seed=[args.seed, i])
            st.tokens.astype(np.uint16).tofile(os.path.join(tmp, f"{s}.bin"))
            meta["tokens"][s], meta["documents"][s] = int(st.tokens.size), n
            if s == "val":
                save_truth(os.path.join(tmp, "val_truth.npz"), st)
            print(f"{s}: {n:,} stories, {st.tokens.size:,} tokens -> {os.path.join(out, s + '.bin')}")
        with atomic_write(os.path.join(tmp, "meta.json")) as f:
            json.dump(meta, f, indent=2)
    print(f"entropy floor of the language: {meta['entropy_floor']:.4f} nats/token (python stories.py)")
    return meta


def main(argv):
    check_help(argv, (PrepareConfig,))
    if not argv or argv[0] not in DATASETS:
        raise ConfigError(f"name the dataset first: python data/prepare.py {{{','.join(DATASETS)}}} [--key=value ...]"
                          f" (got {argv[0] if argv else 'nothing'!r})")
    preset, flags = parse_args(argv[1:], (PrepareConfig,))
    return prepare(argv[0], PrepareConfig(**{**preset, **flags}))


if __name__ == "__main__":
    cli(main)


