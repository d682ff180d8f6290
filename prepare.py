"""
Prepare GPT-2 token shards for train.py, in the llm.c / modded-nanogpt .bin format.

Download the pre-tokenized FineWeb 10B sample (100M tokens = 200 MB per shard):
$ python prepare.py                                  # data/fineweb10B/: val + 1 train shard, 400 MB
$ python prepare.py --num_train_shards 9             # 900M train tokens
$ python prepare.py --dataset finewebedu10B          # the FineWeb-Edu sample instead

Tokenize your own .txt and .jsonl files with tiktoken's GPT-2 BPE into the same format:
$ python prepare.py --text notes.txt more.jsonl --name mydata      # -> data/mydata/

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros)
followed by the tokens as uint16. Every document is preceded by <|endoftext|> (50256).
*_val_000000.bin holds validation tokens; *_train_000001.bin, *_train_000002.bin, ... training tokens.
"""
import argparse
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

MAGIC, VERSION = 20240520, 1  # llm.c's tag for uint16 GPT-2 tokens (its Llama-3 shards use 20240801, 7)
HEADER_BYTES = 256 * 4        # 256 int32, of which only the first 3 are used
EOT = 50256                   # <|endoftext|>, written *before* each document (modded-nanogpt's BOS)
SHARD_SIZE = 10**8            # tokens per shard: 1,024 + 2 * 10^8 = 200,001,024 bytes on disk

# pre-tokenized FineWeb samples on the Hugging Face hub: (repo, file prefix, number of train shards)
DATASETS = {
    'fineweb10B': ('kjj0/fineweb10B-gpt2', 'fineweb', 103),           # 10.3B train tokens, 20.8 GB
    'finewebedu10B': ('kjj0/finewebedu10B-gpt2', 'finewebedu', 99),
}
# 'main' follows the dataset repo's latest commit. Pinning a commit hash is recommended for
# reproducibility: copy the full hash from the repo's history page on huggingface.co and pass
# --revision <hash>; .../resolve/<hash>/<file> then always serves the same bytes.
REVISION = 'main'
RETRIES = 5            # attempts per file, for dropped connections, timeouts and HTTP 5xx
BACKOFF_SECONDS = 2.0  # wait 2, 4, 8, 16 s between attempts: about 30 s for a server to come back
CHUNK_BYTES = 1 << 20  # read and write 1 MiB at a time


class ShardError(ValueError):
    """A token shard, or the folder that should hold shards, is missing, corrupt or truncated."""


class PrepareError(RuntimeError):
    """A download or a text input failed; the message names the file and the reason."""

# -----------------------------------------------------------------------------
# the shard format: check, load, write, list

def check_shard(path):
    """Check a shard's header against its size and return its token count."""
    if not os.path.isfile(path):
        raise ShardError(f'{path}: no such file')
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f'{path}: truncated file: {size} bytes, less than the {HEADER_BYTES}-byte header')
    magic, version, count = (int(x) for x in np.fromfile(path, dtype='<i4', count=3))  # 12 bytes, not the file
    if magic != MAGIC:  # e.g. a .npy file, an HTML error page, or another tokenizer's shard
        raise ShardError(f'{path}: bad magic number {magic}, expected {MAGIC} (not a GPT-2 token shard)')
    if version != VERSION:
        raise ShardError(f'{path}: unsupported version {version}, expected {VERSION} (uint16 GPT-2 tokens)')
    if count <= 0:
        raise ShardError(f'{path}: the token count in the header is {count}; a shard holds at least 1 token')
    # the size must match exactly: short means an interrupted copy, long means a wrong count
    expected = HEADER_BYTES + 2 * count
    if size < expected:
        raise ShardError(f'{path}: truncated file: the header says {count} tokens = {expected} bytes, '
                         f'but the file has {size} bytes')
    if size > expected:
        raise ShardError(f'{path}: the token count in the header ({count}, so {expected} bytes) '
                         f'disagrees with the file size ({size} bytes)')
    return count


def load_shard(path):
    """The checked shard's tokens as a read-only 1-D uint16 memmap: pages load from disk when touched."""
    count = check_shard(path)
    return np.memmap(path, dtype=np.uint16, mode='r', offset=HEADER_BYTES, shape=(count,))  # tokens follow the header


def write_shard(path, tokens):
    """Write tokens as a shard atomically: a reader sees the old file or the whole new one, never half."""
    path, tokens = os.fspath(path), np.asarray(tokens)  # a str or a Path; a list, an array or a shard's memmap
    if tokens.ndim != 1 or tokens.size == 0 or tokens.dtype.kind not in 'iu':
        raise ShardError(f'{path}: tokens must be a non-empty 1-D array of ints, got shape {tokens.shape} '
                         f'of {tokens.dtype}')
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
            f.write(tokens.astype('<u2').tobytes())  # little-endian on any machine, as the format says
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the rename makes them visible
        os.replace(tmp, path)  # atomic on POSIX and Windows, and replaces an older shard
    finally:
        if os.path.exists(tmp):  # only after a failure: the old file at path is untouched
            os.remove(tmp)


def list_shards(data_dir, split):
    """Sorted paths of the '*_{split}_*.bin' shards in data_dir; split is 'train' or 'val'."""
    if split not in ('train', 'val'):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(data_dir):
        raise ShardError(f'data folder {data_dir} does not exist; run `python prepare.py` (FineWeb) '
                         f'or `python prepare.py --text ...` first')
    # the zero-padded indices make the alphabetical order the shard order; '.bin.tmp' never matches
    paths = sorted(glob.glob(os.path.join(glob.escape(data_dir), f'*_{split}_*.bin')))
    if not paths:
        need = ("a val shard is required, e.g. '*_val_000000.bin'" if split == 'val'
                else "expected at least one '*_train_*.bin'")
        raise ShardError(f'{data_dir}: no {split} shard in this folder; {need}')
    return paths

# -----------------------------------------------------------------------------
# download: resume, retry, check, and only then rename into place

def fetch(url, tmp):
    """One attempt: GET url and append to tmp, asking only for the bytes that tmp does not hold yet."""
    name = os.path.basename(tmp).removesuffix('.tmp')
    start = os.path.getsize(tmp) if os.path.exists(tmp) else 0  # bytes kept from an interrupted attempt
    headers = {'User-Agent': 'prepare.py'} | ({'Range': f'bytes={start}-'} if start else {})
    # urllib follows the hub's redirect to its CDN and keeps the Range header on the way. The timeout
    # applies to each socket read, so a stalled transfer fails (and is retried) instead of hanging.
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as resp:
        if resp.status != 206:
            start = 0  # a full body: there was no Range, or the server ignored it, so start over
        length = resp.headers.get('Content-Length')
        total = start + int(length) if length is not None else None  # on a 206, length is the rest
        folder = os.path.dirname(os.path.abspath(tmp))
        free = shutil.disk_usage(folder).free
        if total is not None and free < total - start:  # fail now, not 190 MB into the file
            raise PrepareError(f'{name}: not enough disk space in {folder}: '
                               f'{(total - start) / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free')
        with open(tmp, 'ab' if start else 'wb') as f, \
                tqdm(desc=name, total=total, initial=start, unit='B', unit_scale=True, unit_divisor=1024) as bar:
            while chunk := resp.read(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())  # what tmp holds is on disk, so the next resume offset is right
    # http.client returns b'' instead of raising when a connection closes early, so count the bytes
    if total is not None and os.path.getsize(tmp) < total:
        raise ConnectionError(f'connection dropped after {os.path.getsize(tmp)} of {total} bytes')


def download(url, path):
    """Download url to path through path + '.tmp', which is renamed only after check_shard passes."""
    name, tmp = os.path.basename(path), path + '.tmp'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for attempt in range(1, RETRIES + 1):
        try:
            fetch(url, tmp)
            break
        except urllib.error.HTTPError as e:  # caught before OSError, of which HTTPError is a subclass
            if e.code == 416:  # the range starts at or past the end: tmp is not a prefix, start over
                os.remove(tmp)
            elif e.code < 500 and e.code != 429:  # 404, 403, ...: asking again will not help
                raise PrepareError(f'{name}: HTTP {e.code} {e.reason} for {url} '
                                   f'(check --dataset, --revision and --base_url)') from None
            problem = f'HTTP {e.code} {e.reason}'
        except (OSError, http.client.HTTPException) as e:  # dropped connection, reset, timeout
            if getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):
                raise PrepareError(f'{name}: disk full while writing {tmp}; free some space and '
                                   f'run again to resume from the bytes already there') from None
            problem = f'{type(e).__name__}: {e}'
        if attempt == RETRIES:  # tmp stays, so the next run resumes where this one stopped
            raise PrepareError(f'{name}: download failed after {RETRIES} attempts, last: {problem} '
                               f'({url}); run again to resume')
        wait = BACKOFF_SECONDS * 2 ** (attempt - 1)
        print(f'{name}: {problem}; retrying in {wait:g}s ({attempt + 1}/{RETRIES})', file=sys.stderr)
        time.sleep(wait)
    try:
        check_shard(tmp)  # the same checks that load_shard runs for train.py
    except ShardError as e:  # e.g. an HTML error page served with status 200, or a short file
        os.remove(tmp)
        raise PrepareError(f'{name}: the download is not a valid shard, so it was deleted '
                           f'and not moved into place: {e}') from None
    os.replace(tmp, path)  # only now can the loader see the file


def download_dataset(dataset, data_dir, num_train_shards, revision=REVISION, base_url=None):
    """Fetch the val shard and the first num_train_shards train shards, skipping valid ones on disk."""
    repo, prefix, n_train = DATASETS[dataset]
    if not 0 <= num_train_shards <= n_train:
        raise PrepareError(f'--num_train_shards must be in [0, {n_train}] for {dataset}, got {num_train_shards}')
    # --base_url replaces everything before the file name; '.../dir/' and '.../dir' both work
    base = (base_url or f'https://huggingface.co/datasets/{repo}/resolve/{revision}').rstrip('/')
    names = [f'{prefix}_val_000000.bin'] + [f'{prefix}_train_{i:06d}.bin' for i in range(1, num_train_shards + 1)]
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.exists(path):  # a re-run costs a header read per shard, not 200 MB
            try:
                print(f'{name}: already present ({check_shard(path):,} tokens), skipping')
                continue
            except ShardError as e:
                print(f'{e}; downloading it again', file=sys.stderr)
        download(f'{base}/{name}', path)
    print(f'{len(names)} shards ready in {data_dir}')

# -----------------------------------------------------------------------------
# local text: documents -> GPT-2 tokens -> shards
# As in the FineWeb shards, <|endoftext|> comes *before* each document: a model trained on them sees
# where a document starts, and a batch can be aligned to a document start by looking for 50256.

def iter_documents(paths):
    """Yield the documents of .txt and .jsonl files in order, skipping empty ones (rules in --help)."""
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
                        text = obj.get('text') if isinstance(obj, dict) else None  # other fields are ignored
                        if not isinstance(text, str):
                            raise PrepareError(f"{path}:{lineno}: expected a JSON object with a string field 'text'")
                        if text.strip():  # an empty document would only add a lone EOT
                            yield text
                else:  # .txt: a document ends at a line holding only <|endoftext|>, or at the end of the file
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
    # encode_ordinary treats a literal '<|endoftext|>' in the text as text, so only our EOTs are 50256
    return np.array([EOT] + _enc.encode_ordinary(doc), dtype=np.uint16)


class ShardWriter:
    """Packs one split's token stream into shards of shard_size tokens; a document may span two shards."""

    def __init__(self, data_dir, name, split, shard_size):
        self.data_dir, self.name, self.split = data_dir, name, split
        self.buf, self.n = np.empty(shard_size, dtype=np.uint16), 0  # 200 MB at 10^8, filled as we go
        self.index = 0 if split == 'val' else 1  # llm.c numbering: shard 0 is val, train starts at 1
        self.docs, self.tokens, self.paths = 0, 0, []

    def add(self, tokens):
        self.docs, self.tokens = self.docs + 1, self.tokens + len(tokens)  # for the summary at the end
        while len(tokens):
            take = min(len(tokens), len(self.buf) - self.n)
            self.buf[self.n:self.n + take], tokens = tokens[:take], tokens[take:]  # the rest goes to the next shard
            self.n += take
            if self.n == len(self.buf):
                self.flush()

    def flush(self):
        if self.n:
            path = os.path.join(self.data_dir, f'{self.name}_{self.split}_{self.index:06d}.bin')
            write_shard(path, self.buf[:self.n])
            self.paths.append(path)
            self.index, self.n = self.index + 1, 0


def tokenize_text(paths, name, data_dir, val_fraction=0.01, shard_size=SHARD_SIZE, num_proc=None):
    """Tokenize documents on all cores and hold out every k-th document as val; returns the writers."""
    for p in paths:  # check every input before a long tokenizing run starts
        if not os.path.isfile(p) or not p.endswith(('.txt', '.jsonl')):
            raise PrepareError(f'{p}: expected an existing .txt or .jsonl file')
    existing = glob.glob(os.path.join(glob.escape(data_dir), f'{glob.escape(name)}_*.bin'))
    if existing:  # a run that writes fewer shards than the last one would leave stale shards behind
        raise PrepareError(f'{data_dir} already holds {name} shards ({sorted(existing)[0]}, ...); '
                           f'delete them or choose another --name')
    n_docs = sum(1 for _ in iter_documents(paths))  # a first pass, without tokenizing, to pick the val ones
    if n_docs < 2:
        raise PrepareError(f'found {n_docs} document(s) in {", ".join(paths)}, but val is held out by '
                           f'document, so at least 2 are needed (see --help for how .txt is split)')
    # every stride-th document is val, spread over all inputs: e.g. 1,000 documents at 1% give
    # n_val = 10 and stride = 100, so documents 0, 100, ..., 900. The same inputs give the same split.
    n_val = max(1, round(val_fraction * n_docs))
    stride = n_docs // n_val
    try:
        tokenize('')  # load the BPE here, once, so that a missing file gives one clear error
    except Exception as e:
        raise PrepareError(f"could not load GPT-2's BPE (tiktoken 'r50k_base'): {e}. tiktoken downloads it on "
                           f'first use; offline, point TIKTOKEN_CACHE_DIR at a folder that holds it') from None
    writers = {s: ShardWriter(data_dir, name, s, shard_size) for s in ('val', 'train')}
    num_proc = num_proc or os.cpu_count()
    with mp.Pool(num_proc) if num_proc > 1 else contextlib.nullcontext() as pool:  # 1 process: no pool
        docs = iter_documents(paths)
        # imap keeps the input order (so the split is deterministic); chunksize 16 amortizes the IPC
        stream = pool.imap(tokenize, docs, chunksize=16) if pool else map(tokenize, docs)
        for i, tokens in enumerate(tqdm(stream, total=n_docs, unit='docs', desc=name)):
            # document i is val when it is one of the first n_val multiples of stride
            writers['val' if i % stride == 0 and i // stride < n_val else 'train'].add(tokens)
    for s, w in writers.items():
        w.flush()  # the last, partly filled shard
        print(f'{s}: {w.docs:,} documents, {w.tokens:,} tokens in {len(w.paths)} shard(s) in {data_dir}')
    return writers

# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', choices=sorted(DATASETS), default='fineweb10B', help='remote dataset to download')
    parser.add_argument('--num_train_shards', type=int, default=1, metavar='N',
                        help='train shards of 100M tokens to download')
    parser.add_argument('--revision', default=REVISION, metavar='REV',
                        help='dataset revision on the hub: a branch or, better, a commit hash')
    parser.add_argument('--base_url', metavar='URL', help='mirror URL that replaces everything before the file name')
    parser.add_argument('--data_dir', metavar='DIR', help='output folder (default: data/DATASET or data/NAME)')
    parser.add_argument('--text', nargs='+', metavar='PATH',
                        help="tokenize these files instead of downloading. A .jsonl file holds one document per "
                             "line, in its 'text' field. A .txt file is split into documents at lines that hold only "
                             "<|endoftext|>; a .txt file without such a line is one document")
    parser.add_argument('--name', help='name of the tokenized dataset (with --text): data/NAME/NAME_*.bin')
    parser.add_argument('--val_fraction', type=float, default=0.01, metavar='F',
                        help='fraction of documents held out as val (at least 1 document, so 2 are needed)')
    parser.add_argument('--shard_size', type=int, default=SHARD_SIZE, metavar='N', help='tokens per shard')
    parser.add_argument('--num_proc', type=int, default=os.cpu_count(), metavar='N',
                        help='tokenizer processes (default: all cores)')
    args = parser.parse_args(argv)
    if bool(args.text) != bool(args.name):
        parser.error('--text and --name go together')
    if not 0 < args.val_fraction <= 0.5:  # at most half, so train keeps at least as many documents
        parser.error(f'--val_fraction must be in (0, 0.5], got {args.val_fraction}')
    if not 0 < args.shard_size < 2**31:
        parser.error(f'--shard_size must be in [1, 2^31 - 1], got {args.shard_size}')
    try:
        if args.text:
            data_dir = args.data_dir or os.path.join('data', args.name)  # relative to the working directory
            tokenize_text(args.text, args.name, data_dir, args.val_fraction, args.shard_size, args.num_proc)
        else:
            data_dir = args.data_dir or os.path.join('data', args.dataset)
            download_dataset(args.dataset, data_dir, args.num_train_shards, args.revision, args.base_url)
    except (ShardError, PrepareError, OSError) as e:
        sys.exit(f'error: {e}')  # an expected failure: one line on stderr, exit status 1, no traceback


if __name__ == '__main__':
    main()
