"""
Prepare GPT-2 token shards for train.py, in the llm.c / modded-nanogpt .bin format.

Download the pre-tokenized FineWeb 10B sample (100M tokens = 200 MB per shard):
$ python prepare.py                           # data/fineweb10B/: val + 1 train shard, 400 MB
$ python prepare.py --max_tokens=1000000      # the first 1M tokens of each: 4 MB, for a quick start
$ python prepare.py --num_train_shards=9      # 900M train tokens
$ python prepare.py --dataset=finewebedu10B   # the FineWeb-Edu sample instead
$ python prepare.py --revision=<commit hash>  # the same bytes on every run (REVISION in prepare.py)

Tokenize your own .txt and .jsonl files with tiktoken's GPT-2 BPE into the same format:
$ python prepare.py --text=notes.txt,more.jsonl --name=mydata      # -> data/mydata/

A .jsonl file holds one document per line, in its 'text' field. A .txt file is split into documents
at lines that hold only <|endoftext|>; a .txt file without such a line is one document. Every k-th
document is held out as val (val_fraction of them, at least 1, so at least 2 documents are needed).

Shards go to data/DATASET or data/NAME, or --data_dir; --base_url=URL downloads from a mirror of
the hub. Each option is explained next to its default in prepare.py; a bad value stops the run
before it starts.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros)
followed by the tokens as uint16. Every document is preceded by <|endoftext|> (50256).
*_val_000000.bin holds validation tokens; *_train_000001.bin, *_train_000002.bin, ... training
tokens. A shard cut short by --max_tokens keeps the whole shard's token count in int32 #3 (0 in a
whole shard), so that a later run can tell it from a whole one.
"""
import contextlib
import errno
import glob
import http.client
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import tiktoken
from tqdm import tqdm

import cli

MAGIC, VERSION = 20240520, 1  # llm.c's tag for uint16 GPT-2 tokens (Llama-3 shards: 20240801, 7)
HEADER_BYTES = 256 * 4        # 256 int32, of which only the first 3 are used (4 in a cut shard)
EOT = 50256                   # <|endoftext|>, written *before* each document (modded-nanogpt's BOS)
SHARD_SIZE = 10**8            # tokens per shard: 1,024 + 2 * 10^8 = 200,001,024 bytes on disk

# pre-tokenized FineWeb samples on the Hugging Face hub: (repo, file prefix, number of train shards)
DATASETS = {
    'fineweb10B': ('kjj0/fineweb10B-gpt2', 'fineweb', 103),           # 10.3B train tokens, 20.8 GB
    'finewebedu10B': ('kjj0/finewebedu10B-gpt2', 'finewebedu', 99),
}
# 'main' follows the dataset repo's latest commit. Pinning a commit hash is recommended for
# reproducibility: copy the full hash from the repo's history page on huggingface.co and pass
# --revision=<hash>; .../resolve/<hash>/<file> then always serves the same bytes.
REVISION = 'main'
RETRIES = 5            # attempts per file, for dropped connections, timeouts and HTTP 5xx
BACKOFF_SECONDS = 2.0  # wait 2, 4, 8, 16 s between attempts: about 30 s for a server to come back
CHUNK_BYTES = 1 << 20  # read and write 1 MiB at a time

defaults = dict(
    # download a FineWeb sample (the default) ...
    dataset='fineweb10B',     # fineweb10B or finewebedu10B, see DATASETS
    num_train_shards=1,       # train shards of 100M tokens, 0 to 103 (99 for finewebedu10B);
                              # val comes too
    max_tokens=0,             # only the first N tokens of each shard (HTTP Range); 0 = whole shards
    revision=REVISION,        # the dataset repo's branch or, better, commit hash
    base_url='',              # a mirror: replaces everything before the file name ('' = the hub)
    # ... or tokenize files of your own
    text='',                  # .txt and .jsonl files, separated by commas:
                              # --text=notes.txt,more.jsonl
    name='',                  # the name of their shards, with --text:
                              # data/NAME/NAME_val_000000.bin, ...
    val_fraction=0.01,        # documents held out as val, in (0, 0.5]: train keeps at least as many
    shard_size=SHARD_SIZE,    # tokens per shard
    num_proc=os.cpu_count() or 1,  # tokenizer processes: all cores
    # both
    data_dir='',              # the output folder; '' = data/DATASET or data/NAME
)
DOWNLOAD_KEYS = ('dataset', 'num_train_shards', 'max_tokens', 'revision', 'base_url')
TEXT_KEYS = ('name', 'val_fraction', 'shard_size', 'num_proc')


class ShardError(ValueError):
    """A token shard, or the folder that should hold shards, is missing, corrupt or truncated."""


class PrepareError(RuntimeError):
    """A download, a text input or an option failed; the message names it and the reason."""

# -----------------------------------------------------------------------------
# the shard format: check, load, write, list

def check_shard(path):
    """Check a shard's header against its size and return its token count."""
    if not os.path.isfile(path):
        raise ShardError(f'{path}: no such file')
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f'{path}: truncated file: {size} bytes, '
                         f'less than the {HEADER_BYTES}-byte header')
    # 12 bytes, not the file
    magic, version, count = (int(x) for x in np.fromfile(path, dtype='<i4', count=3))
    if magic != MAGIC:  # e.g. a .npy file, an HTML error page, or another tokenizer's shard
        raise ShardError(f'{path}: bad magic number {magic}, expected {MAGIC} '
                         f'(not a GPT-2 token shard)')
    if version != VERSION:
        raise ShardError(f'{path}: unsupported version {version}, expected {VERSION} '
                         f'(uint16 GPT-2 tokens)')
    if count <= 0:
        raise ShardError(f'{path}: the token count in the header is {count}; '
                         f'a shard holds at least 1 token')
    # the size must match exactly: short means an interrupted copy, long means a wrong count
    expected = HEADER_BYTES + 2 * count
    if size < expected:
        raise ShardError(f'{path}: truncated file: the header says {count} tokens = '
                         f'{expected} bytes, but the file has {size} bytes')
    if size > expected:
        raise ShardError(f'{path}: the token count in the header ({count}, so {expected} bytes) '
                         f'disagrees with the file size ({size} bytes)')
    return count


def load_shard(path, vocab_size=None):
    """The checked shard's tokens as a read-only 1-D uint16 memmap: pages load from disk when
    touched. With vocab_size, every token id must be below it, so that a shard of another tokenizer
    fails here and not as an index error in the embedding mid-run. That reads the whole file once:
    0.02 s per 100M tokens in the page cache, the time to read 200 MB from disk otherwise."""
    count = check_shard(path)
    tokens = np.memmap(path, dtype=np.uint16, mode='r', offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None and (top := int(tokens.max())) >= vocab_size:
        # a second pass, only on the way to an error: the first id that high
        where = int(tokens.argmax())
        raise ShardError(f'{path}: token id {top} at position {where:,} '
                         f'is not below vocab_size={vocab_size}')
    return tokens


def write_shard(path, tokens):
    """Write tokens as a shard atomically: a reader sees the old file or the whole new one,
    never half."""
    # a str or a Path; a list, an array or a shard's memmap
    path, tokens = os.fspath(path), np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0 or tokens.dtype.kind not in 'iu':
        raise ShardError(f'{path}: tokens must be a non-empty 1-D array of ints, '
                         f'got shape {tokens.shape} of {tokens.dtype}')
    # uint16 holds ids up to 65,535 (GPT-2 has 50,257) and the int32 count up to 2^31 - 1 tokens
    if tokens.min() < 0 or tokens.max() >= 2**16 or tokens.size >= 2**31:
        raise ShardError(f'{path}: tokens must lie in [0, 65535] and number fewer than 2^31, '
                         f'got {tokens.size} in [{tokens.min()}, {tokens.max()}]')
    header = np.zeros(256, dtype='<i4')
    header[:3] = MAGIC, VERSION, tokens.size  # the other 253 int32 stay 0, as llm.c writes them
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'  # in the same folder, so that os.replace is an atomic rename
    try:
        with open(tmp, 'wb') as f:
            f.write(header.tobytes())
            # little-endian on any machine, as the format says
            f.write(tokens.astype('<u2').tobytes())
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the rename makes them visible
        os.replace(tmp, path)  # atomic on POSIX and Windows, and replaces an older shard
    finally:
        if os.path.exists(tmp):  # only after a failure: the old file at path is untouched
            os.remove(tmp)


def cut_shard(path, max_tokens):
    """Make the file at path, the first bytes of a shard, a shard of its first max_tokens tokens
    (all of them if it has fewer): the header's count says what the file holds, and int32 #3 keeps
    the count of the whole shard, so that a later run knows this is only its start."""
    header = np.fromfile(path, dtype='<i4', count=4)
    if len(header) < 4 or header[0] != MAGIC:
        return  # not a shard's header: check_shard says what is wrong
    # #3 is set if an earlier attempt cut this file but did not rename it
    whole = int(header[3] or header[2])
    count = min(max_tokens, whole)
    header[2:4] = count, (whole if count < whole else 0)
    with open(path, 'r+b') as f:
        f.write(header.tobytes())
        if count < whole and os.path.getsize(path) > HEADER_BYTES + 2 * count:
            # the file may hold more, kept from a longer attempt
            f.truncate(HEADER_BYTES + 2 * count)
        f.flush()
        os.fsync(f.fileno())


def whole_count(path):
    """The token count of the whole shard that the checked shard at path starts: its own,
    unless cut."""
    count, whole = (int(x) for x in np.fromfile(path, dtype='<i4', count=4)[2:])
    return whole or count


def list_shards(data_dir, split):
    """Sorted paths of the '*_{split}_*.bin' shards in data_dir; split is 'train' or 'val'."""
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(data_dir):
        raise ShardError(f'data folder {data_dir} does not exist; run `python prepare.py` '
                         f'(FineWeb) or `python prepare.py --text=...` first')
    # the zero-padded indices make the alphabetical order the shard order; '.bin.tmp' never matches
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), f'*_{split}_*.bin')))
    if not paths:
        need = ("a val shard is required, e.g. '*_val_000000.bin'" if split == 'val'
                else "expected at least one '*_train_*.bin'")
        raise ShardError(f'{data_dir}: no {split} shard in this folder; {need}')
    return paths

# -----------------------------------------------------------------------------
# download: resume, retry, check, and only then rename into place

def fetch(url, tmp, size=None):
    """One attempt: GET url into tmp up to its first size bytes (None: all of them), asking only for
    the bytes that tmp does not hold yet."""
    name = os.path.basename(tmp).removesuffix('.tmp')
    # bytes kept from an interrupted attempt
    start = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    if size is not None and start >= size:
        return  # an earlier attempt, of a longer start or of the whole file, got them all
    # 1M tokens are bytes=0-2001023: the 1,024-byte header and 2 * 10^6 bytes;
    # the rest is bytes=START-
    span = f'bytes={start}-{"" if size is None else size - 1}'
    headers = {'User-Agent': 'prepare.py'} | ({'Range': span} if start or size else {})
    # urllib follows the hub's redirect to its CDN and keeps the Range header on the way. Timeouts
    # apply to each socket read, so a stalled transfer fails (and is retried) instead of hanging.
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
        if resp.status != 206:
            start = 0  # a full body: there was no Range, or the server ignored it, so start over
        length = resp.headers.get('Content-Length')
        total = start + int(length) if length is not None else None  # on a 206, length is the rest
        if size is not None:  # also where a 200 sends all 200 MB: read only the bytes wanted
            total = size if total is None else min(total, size)
        folder = os.path.dirname(os.path.abspath(tmp))
        free = shutil.disk_usage(folder).free
        if total is not None and free < total - start:  # fail now, not 190 MB into the file
            raise OSError(errno.ENOSPC,
                          f'{(total - start) / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free')
        done = start
        with open(tmp, 'ab' if start else 'wb') as f, \
                tqdm(desc=name, total=total, initial=start, unit='B', unit_scale=True,
                     unit_divisor=1024) as bar:
            while done != total:
                chunk = resp.read(CHUNK_BYTES if total is None else min(CHUNK_BYTES, total - done))
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())  # what tmp holds is on disk, so the next resume offset is right
    # http.client returns b'' instead of raising when a connection closes early, so count the bytes
    if total is not None and done < total:
        raise ConnectionError(f'connection dropped after {done} of {total} bytes')


def download(url, path, max_tokens=0):
    """Download url to path through path + '.tmp', which is renamed only after check_shard passes;
    with max_tokens, only the shard's first max_tokens tokens (see cut_shard)."""
    name, tmp = os.path.basename(path), path + '.tmp'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for attempt in range(1, RETRIES + 1):
        try:
            fetch(url, tmp, HEADER_BYTES + 2 * max_tokens if max_tokens else None)
            break
        # caught before OSError, of which HTTPError is a subclass
        except urllib.error.HTTPError as e:
            # 416: the range starts at or past the end: tmp is not a prefix, start over
            if e.code == 416:
                os.remove(tmp)
            elif e.code < 500 and e.code != 429:  # 404, 403, ...: asking again will not help
                raise PrepareError(f'{name}: HTTP {e.code} {e.reason} for {url}; '
                                   f'is the file there? '
                                   f'check --dataset, --revision and --base_url') from None
            problem = f'HTTP {e.code} {e.reason}'
        except (OSError, http.client.HTTPException) as e:  # dropped connection, reset, timeout
            if getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):  # retrying cannot help
                if os.path.exists(tmp):
                    # half a shard is of no use, and deleting it gives the space back
                    os.remove(tmp)
                # MB, quota
                detail = '' if e.strerror == os.strerror(errno.ENOSPC) else f' ({e.strerror})'
                raise PrepareError(f'{path}: no space left on device{detail}; no partial file '
                                   f'was kept, free some space and run again') from None
            problem = f'{type(e).__name__}: {e}'
        if attempt == RETRIES:  # tmp stays, so the next run resumes where this one stopped
            raise PrepareError(f'{name}: download failed after {RETRIES} attempts, last: {problem} '
                               f'({url}); run again to resume')
        wait = BACKOFF_SECONDS * 2 ** (attempt - 1)
        print(f'{name}: {problem}; retrying in {wait:g}s ({attempt + 1}/{RETRIES})',
              file=sys.stderr)
        time.sleep(wait)
    try:
        if max_tokens:
            cut_shard(tmp, max_tokens)
        check_shard(tmp)  # the same checks that load_shard runs for train.py
    except ShardError as e:  # e.g. an HTML error page served with status 200, or a short file
        os.remove(tmp)
        raise PrepareError(f'{name}: the download is not a valid shard, so it was deleted '
                           f'and not moved into place: {e}') from None
    # only now can the loader see the file, and an older one is replaced whole
    os.replace(tmp, path)


def download_dataset(dataset, data_dir, num_train_shards, revision=REVISION, base_url=None,
                     max_tokens=0):
    """Fetch the val shard and the first num_train_shards train shards, or the first max_tokens
    tokens of each, skipping those already on disk. A whole shard on disk stays: --max_tokens
    never cuts one."""
    repo, prefix, _ = DATASETS[dataset]
    # --base_url replaces everything before the file name; '.../dir/' and '.../dir' both work
    base = (base_url or f'https://huggingface.co/datasets/{repo}/resolve/{revision}').rstrip('/')
    names = [f'{prefix}_val_000000.bin'] + [f'{prefix}_train_{i:06d}.bin'
                                            for i in range(1, num_train_shards + 1)]
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.exists(path):  # a re-run costs a header read per shard, not 200 MB
            try:
                count, whole = check_shard(path), whole_count(path)
            except ShardError as e:
                print(f'{e}; downloading it again', file=sys.stderr)
            else:
                held = (f'{count:,} tokens' if count == whole
                        else f'the first {count:,} of {whole:,} tokens')
                if count in (whole, max_tokens):
                    print(f'{name}: already present ({held}), skipping')
                    continue
                print(f'{name}: holds {held}; downloading it again', file=sys.stderr)
        download(f'{base}/{name}', path, max_tokens)
    print(f'{len(names)} shards ready in {data_dir}')

# -----------------------------------------------------------------------------
# local text: documents -> GPT-2 tokens -> shards
# As in the FineWeb shards, <|endoftext|> comes *before* each document: a model trained on them sees
# where a document starts, and a batch can be aligned to a document start by looking for 50256.

def iter_documents(paths):
    """Yield the documents of .txt and .jsonl files in order, skipping empty ones (see --help)."""
    for path in paths:
        try:
            with open(path, encoding='utf-8') as f:
                if path.endswith('.jsonl'):  # one JSON object per line, the document in 'text'
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():  # blank lines between records are allowed
                            continue
                        try:
                            obj = json.loads(line)
                        except ValueError as e:
                            raise PrepareError(f'{path}:{lineno}: not valid JSON ({e})') from None
                        # other fields are ignored
                        text = obj.get('text') if isinstance(obj, dict) else None
                        if not isinstance(text, str):
                            raise PrepareError(f"{path}:{lineno}: expected a JSON object "
                                               f"with a string field 'text'")
                        if text.strip():  # an empty document would only add a lone EOT
                            yield text
                else:
                    # .txt: a document ends at a line holding only <|endoftext|>,
                    # or at the end of the file
                    lines = []
                    for line in f:  # line by line, so a large file never sits in memory whole
                        if line.strip() != '<|endoftext|>':
                            lines.append(line)
                            continue
                        if ''.join(lines).strip():
                            yield ''.join(lines)
                        lines = []
                    if ''.join(lines).strip():
                        yield ''.join(lines)
        except UnicodeDecodeError as e:  # e.g. a Latin-1 file: name it rather than fail mid-run
            raise PrepareError(f'{path}: not UTF-8 text ({e})') from None


_enc = None  # the tokenizer, loaded once per process

def tokenize(doc):
    """[EOT] + the document's GPT-2 tokens, as uint16 (every id is < 50,257 < 65,536)."""
    global _enc
    if _enc is None:
        _enc = tiktoken.get_encoding('r50k_base')  # GPT-2's BPE: the same ids as tiktoken's 'gpt2'
    # encode_ordinary treats a literal '<|endoftext|>' in the text as text: only our EOTs are 50256
    return np.array([EOT] + _enc.encode_ordinary(doc), dtype=np.uint16)


class ShardWriter:
    """Packs one split's token stream into shards of shard_size tokens (a document may span two)."""

    def __init__(self, data_dir, name, split, shard_size):
        self.data_dir, self.name, self.split = data_dir, name, split
        # 200 MB at 10^8, filled as we go
        self.buf, self.n = np.empty(shard_size, dtype=np.uint16), 0
        # llm.c numbering: shard 0 is val, train starts at 1
        self.index = 0 if split == 'val' else 1
        self.docs, self.tokens, self.paths = 0, 0, []

    def add(self, tokens):
        # for the summary at the end
        self.docs, self.tokens = self.docs + 1, self.tokens + len(tokens)
        while len(tokens):
            take = min(len(tokens), len(self.buf) - self.n)
            # the rest goes to the next shard
            self.buf[self.n:self.n + take], tokens = tokens[:take], tokens[take:]
            self.n += take
            if self.n == len(self.buf):
                self.flush()

    def flush(self):
        if self.n:
            path = os.path.join(self.data_dir, f'{self.name}_{self.split}_{self.index:06d}.bin')
            write_shard(path, self.buf[:self.n])
            self.paths.append(path)
            self.index, self.n = self.index + 1, 0


def tokenize_text(paths, name, data_dir, val_fraction=0.01, shard_size=SHARD_SIZE,
                  num_proc=None):
    """Tokenize documents on all cores and hold out every k-th document as val; returns the
    writers."""
    for p in paths:  # check every input before a long tokenizing run starts
        if not os.path.isfile(p) or not p.endswith(('.txt', '.jsonl')):
            raise PrepareError(f'--text: {p}: expected an existing .txt or .jsonl file')
    existing = glob.glob(os.path.join(glob.escape(data_dir), f'{glob.escape(name)}_*.bin'))
    if existing:  # a run that writes fewer shards than the last one would leave stale shards behind
        raise PrepareError(f'{data_dir} already holds {name} shards ({sorted(existing)[0]}, ...); '
                           f'delete them or choose another --name')
    # a first pass, without tokenizing, to pick the val ones
    n_docs = sum(1 for _ in iter_documents(paths))
    if n_docs < 2:
        raise PrepareError(f'found {n_docs} document(s) in {", ".join(paths)}, '
                           f'but val is held out by document, so at least 2 are needed '
                           f'(see --help for how .txt is split)')
    # every stride-th document is val, spread over all inputs: e.g. 1,000 documents at 1% give
    # n_val = 10 and stride = 100, so documents 0, 100, ..., 900. The same inputs, the same split.
    n_val = max(1, round(val_fraction * n_docs))
    stride = n_docs // n_val
    try:
        tokenize('')  # load the BPE here, once, so that a missing file gives one clear error
    except Exception as e:
        raise PrepareError(f"could not load GPT-2's BPE (tiktoken 'r50k_base'): {e}. "
                           f'tiktoken downloads it on first use; offline, point TIKTOKEN_CACHE_DIR '
                           f'at a folder that holds it') from None
    writers = {s: ShardWriter(data_dir, name, s, shard_size) for s in ('val', 'train')}
    num_proc = num_proc or os.cpu_count()
    # 1 process: no pool
    with mp.Pool(num_proc) if num_proc > 1 else contextlib.nullcontext() as pool:
        docs = iter_documents(paths)
        # imap keeps the input order (so the split is deterministic); chunksize 16 amortizes the IPC
        stream = pool.imap(tokenize, docs, chunksize=16) if pool else map(tokenize, docs)
        for i, tokens in enumerate(tqdm(stream, total=n_docs, unit='docs', desc=name)):
            # document i is val when it is one of the first n_val multiples of stride
            writers['val' if i % stride == 0 and i // stride < n_val else 'train'].add(tokens)
    for s, w in writers.items():
        w.flush()  # the last, partly filled shard
        print(f'{s}: {w.docs:,} documents, {w.tokens:,} tokens in {len(w.paths)} shard(s) '
              f'in {data_dir}')
    return writers

# -----------------------------------------------------------------------------
# the command line: every option checked before anything is downloaded or written

def out_dir(cfg):
    # relative to the cwd
    return cfg['data_dir'] or os.path.join('data', cfg['name'] or cfg['dataset'])


def check_config(cfg):
    """Raise PrepareError naming the first option whose value cannot work, and what it expects."""
    text, name, base_url = cfg['text'], cfg['name'], cfg['base_url']
    # an option of the other mode would be ignored without a word: e.g. --max_tokens does not
    # cut --text
    for key in DOWNLOAD_KEYS if text else TEXT_KEYS:
        if cfg[key] != defaults[key]:
            raise PrepareError(f'--{key}={cfg[key]}: '
                               f'applies only {"without" if text else "with"} --text')
    n_train = DATASETS[cfg['dataset']][2] if cfg['dataset'] in DATASETS else 0
    folder = os.path.abspath(out_dir(cfg))
    while not os.path.exists(folder):  # the nearest part that exists: makedirs creates the rest
        folder = os.path.dirname(folder)
    checks = [
        ('dataset', cfg['dataset'] in DATASETS, ' or '.join(DATASETS)),
        ('num_train_shards', 0 <= cfg['num_train_shards'] <= n_train,
         f'0 to {n_train} for {cfg["dataset"]}'),
        ('max_tokens', cfg['max_tokens'] >= 0, 'a number of tokens >= 0 (0 = whole shards)'),
        ('revision', cfg['revision'] != '', 'a branch or commit hash of the dataset repo'),
        ('revision', not base_url or cfg['revision'] == REVISION,
         'none with --base_url, which replaces it'),
        ('base_url', not base_url or base_url.startswith(('http://', 'https://')),
         'an http(s):// URL'),
        ('name', not text or name and name == os.path.basename(name) and name not in ('.', '..'),
         'a file name for the shards of --text (data/NAME/NAME_val_000000.bin, ...)'),
        ('val_fraction', 0 < cfg['val_fraction'] <= 0.5,
         'in (0, 0.5]: train keeps the most documents'),
        ('shard_size', 0 < cfg['shard_size'] < 2**31, 'in [1, 2^31 - 1], an int32 in the header'),
        ('num_proc', cfg['num_proc'] >= 1, 'at least 1 process'),
        ('data_dir', os.path.isdir(folder), f'a folder, but {folder} is a file'),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise PrepareError(f'--{key}={cfg[key]}: expected {expected}')


def main(argv=None):
    cfg = cli.parse(sys.argv[1:] if argv is None else argv, defaults, __doc__)
    try:
        check_config(cfg)
        if cfg['text']:
            paths = [p for p in cfg['text'].split(',') if p]  # 'a.txt,' is a.txt
            tokenize_text(paths, cfg['name'], out_dir(cfg), cfg['val_fraction'], cfg['shard_size'],
                          cfg['num_proc'])
        else:
            download_dataset(cfg['dataset'], out_dir(cfg), cfg['num_train_shards'], cfg['revision'],
                             cfg['base_url'], cfg['max_tokens'])
    except (ShardError, PrepareError, OSError) as e:
        # an expected failure: one line on stderr, exit status 1, no traceback
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
