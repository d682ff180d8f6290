"""Tests for prepare.py: the shard format, robust downloads from a local HTTP server, and tokenization.

All on CPU and offline: downloads come from an http.server on 127.0.0.1 started here, and only the
test marked as needing GPT-2's BPE reads tiktoken's cached r50k_base file (it skips without it).
"""
import errno
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from prepare import EOT, PrepareError, ShardError, list_shards, load_shard, write_shard  # noqa: E402


def raw_shard(path, magic=20240520, version=1, count=None, tokens=(1, 2, 3), header_bytes=1024):
    """Write a shard by hand, so that each field can be wrong on purpose."""
    tokens = np.asarray(tokens, dtype='<u2')
    header = np.zeros(256, dtype='<i4')
    header[:3] = magic, version, len(tokens) if count is None else count
    Path(path).write_bytes(header.tobytes()[:header_bytes] + tokens.tobytes())
    return path


def shard_bytes(tokens, magic=20240520):
    header = np.zeros(256, dtype='<i4')
    header[:3] = magic, 1, len(tokens)
    return header.tobytes() + np.asarray(tokens, dtype='<u2').tobytes()

# -----------------------------------------------------------------------------
# the shard format

def test_write_then_load_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=5000)
    tokens[:3] = 0, EOT, 65535  # both ends of uint16 and the separator
    path = tmp_path / 'new' / 'sub' / 'toy_train_000001.bin'  # parent folders do not exist yet
    write_shard(str(path), tokens)
    assert path.stat().st_size == 1024 + 2 * 5000
    assert np.fromfile(path, dtype='<i4', count=256).tolist() == [20240520, 1, 5000] + [0] * 253
    loaded = load_shard(str(path))
    assert isinstance(loaded, np.memmap) and loaded.dtype == np.uint16 and loaded.shape == (5000,)
    np.testing.assert_array_equal(loaded, tokens)
    assert os.listdir(path.parent) == ['toy_train_000001.bin']  # no temporary file left behind
    write_shard(str(path), [7, 8, 9])  # a plain list works too, and replaces the old shard
    assert load_shard(str(path)).tolist() == [7, 8, 9]


@pytest.mark.parametrize('tokens, problem', [
    ([1, 70000], r'\[0, 65535\]'),
    ([-1, 5], r'\[0, 65535\]'),
    ([], 'non-empty 1-D'),
    ([[1, 2], [3, 4]], 'non-empty 1-D'),
    ([0.5, 1.0], 'of ints'),
])
def test_write_shard_rejects_bad_tokens_and_keeps_the_old_file(tmp_path, tokens, problem):
    path = str(tmp_path / 'x_train_000001.bin')
    write_shard(path, [1, 2, 3])
    with pytest.raises(ShardError, match=problem) as e:
        write_shard(path, tokens)
    assert path in str(e.value)
    assert load_shard(path).tolist() == [1, 2, 3]
    assert os.listdir(tmp_path) == ['x_train_000001.bin']


@pytest.mark.parametrize('fields, problem', [
    (dict(magic=20240801), 'bad magic number 20240801, expected 20240520'),
    (dict(version=7), 'unsupported version 7, expected 1'),
    (dict(count=100, tokens=range(60)), 'truncated file: the header says 100 tokens = 1224 bytes, but the file has 1144'),
    (dict(header_bytes=100, tokens=()), 'truncated file: 100 bytes, less than the 1024-byte header'),
    (dict(count=50, tokens=range(100)), r'count in the header \(50, so 1124 bytes\) disagrees with the file size \(1224'),
    (dict(count=0, tokens=()), 'token count in the header is 0'),
    (dict(count=-3), 'token count in the header is -3'),
])
def test_load_shard_rejects_bad_shards_naming_file_and_problem(tmp_path, fields, problem):
    path = raw_shard(tmp_path / 'bad_val_000000.bin', **fields)
    with pytest.raises(ShardError, match=problem) as e:
        load_shard(str(path))
    assert str(path) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_load_shard_missing_file(tmp_path):
    with pytest.raises(ShardError, match='no_val_000000.bin: no such file'):
        load_shard(str(tmp_path / 'no_val_000000.bin'))


def test_load_shard_checks_token_ids_against_vocab_size(tmp_path):
    path = tmp_path / 'x_train_000001.bin'
    tokens = np.full(5000, 7)
    tokens[[10, 1234, 4000]] = 50256, 50300, 50300  # the first of the highest ids is reported
    write_shard(path, tokens)
    assert len(load_shard(str(path))) == 5000  # no vocab_size: no check
    assert len(load_shard(str(path), vocab_size=50304)) == 5000  # GPT-2's 50,257 padded to 50,304
    with pytest.raises(ShardError) as e:
        load_shard(str(path), vocab_size=50257)
    assert str(e.value) == f'{path}: token id 50300 at position 1,234 is not below vocab_size=50257'
    with pytest.raises(ShardError, match='token id 50300 at position 1,234 is not below vocab_size=50300'):
        load_shard(str(path), vocab_size=50300)


def test_list_shards(tmp_path):
    for name in ['a_train_000002.bin', 'a_train_000001.bin', 'a_val_000000.bin', 'a_train_000003.bin.tmp', 'notes.txt']:
        (tmp_path / name).write_bytes(b'')
    d = str(tmp_path)
    assert list_shards(d, 'train') == [os.path.join(d, 'a_train_000001.bin'), os.path.join(d, 'a_train_000002.bin')]
    assert list_shards(d, 'val') == [os.path.join(d, 'a_val_000000.bin')]
    with pytest.raises(ValueError, match='split must be'):
        list_shards(d, 'test')
    with pytest.raises(ShardError, match='does not exist') as e:
        list_shards(str(tmp_path / 'missing'), 'train')
    assert str(tmp_path / 'missing') in str(e.value)
    (tmp_path / 'a_val_000000.bin').unlink()
    with pytest.raises(ShardError, match=r"no val shard in this folder; a val shard is required, e.g. '\*_val_000000"):
        list_shards(d, 'val')
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ShardError, match='no train shard') as e:
        list_shards(str(empty), 'train')
    assert str(empty) in str(e.value)

# -----------------------------------------------------------------------------
# downloads from a local server that misbehaves on request

class Handler(BaseHTTPRequestHandler):
    """Serves `files` (URL path -> bytes) with Range support (bytes=A- and bytes=A-B). `plans` maps a URL path
    to the actions of its next requests: 'drop' (close mid-body), 'norange' (ignore Range), '500', '404';
    then 'ok'. `sent` gets the number of body bytes each answer got out before the client hung up."""
    files, plans, log, sent = {}, {}, [], []

    def do_GET(self):
        self.log.append((self.path, self.headers.get('Range')))
        plan = self.plans.get(self.path)
        action = plan.pop(0) if plan else 'ok'
        if action == '500' or action == '404' or self.path not in self.files:
            self.send_error(500 if action == '500' else 404)
            return
        data = self.files[self.path]
        start, end = 0, len(data) - 1
        if self.headers.get('Range') and action != 'norange':
            first, _, last = self.headers['Range'].removeprefix('bytes=').partition('-')
            start, end = int(first), min(int(last or end), end)  # a range past the end stops at the end
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{end}/{len(data)}')
        else:
            self.send_response(200)
        body = data[start:end + 1]
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        # HTTP/1.0: the server closes the connection when this returns, so 'drop' cuts the body in half
        body, sent = body[:len(body) // 2] if action == 'drop' else body, 0
        try:
            for i in range(0, len(body), 1 << 16):  # 64 KiB at a time, counting what got out
                self.wfile.write(chunk := body[i:i + (1 << 16)])
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the client read what it wanted and closed
            pass
        self.sent.append(sent)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    handler = type('TestHandler', (Handler,), {'files': {}, 'plans': {}, 'log': [], 'sent': []})
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)  # fast shutdown
    thread.start()
    monkeypatch.setattr(prepare, 'BACKOFF_SECONDS', 0.01)  # retries in milliseconds, not seconds
    handler.url = f'http://127.0.0.1:{httpd.server_address[1]}/mirror'
    yield handler
    httpd.shutdown()
    httpd.server_close()


def serve_fineweb(server, num_train=2, n=3000):
    """Put fineweb_val_000000.bin and fineweb_train_00000{1..num_train}.bin on the server."""
    rng = np.random.default_rng(1)
    names = ['fineweb_val_000000.bin'] + [f'fineweb_train_{i:06d}.bin' for i in range(1, num_train + 1)]
    for name in names:
        server.files[f'/mirror/{name}'] = shard_bytes(rng.integers(0, 50257, size=n))
    return names


def test_download_fetches_shards_and_skips_valid_ones(server, tmp_path):
    names = serve_fineweb(server)
    d = tmp_path / 'fw'
    prepare.main([f'--base_url={server.url}/', f'--data_dir={d}', '--num_train_shards=2'])
    assert sorted(os.listdir(d)) == sorted(names)
    for name in names:
        assert (d / name).read_bytes() == server.files[f'/mirror/{name}']
    assert [p for p, _ in server.log] == [f'/mirror/{name}' for name in names]
    prepare.main([f'--base_url={server.url}', f'--data_dir={d}', '--num_train_shards=2'])
    assert len(server.log) == 3  # all present and valid: nothing fetched
    bad = d / 'fineweb_train_000002.bin'
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated by hand: fetched again
    prepare.main([f'--base_url={server.url}', f'--data_dir={d}', '--num_train_shards=2'])
    assert server.log[3:] == [('/mirror/fineweb_train_000002.bin', None)]
    assert bad.read_bytes() == server.files['/mirror/fineweb_train_000002.bin']


def test_download_resumes_a_dropped_connection_with_range(server, tmp_path):
    serve_fineweb(server, num_train=0)
    path = '/mirror/fineweb_val_000000.bin'
    server.plans[path] = ['drop']
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url)
    half = len(server.files[path]) // 2
    assert server.log == [(path, None), (path, f'bytes={half}-')]  # the second request asks for the rest
    assert (tmp_path / 'fineweb_val_000000.bin').read_bytes() == server.files[path]
    assert os.listdir(tmp_path) == ['fineweb_val_000000.bin']


def test_download_starts_over_when_the_server_ignores_range(server, tmp_path):
    serve_fineweb(server, num_train=0)
    path = '/mirror/fineweb_val_000000.bin'
    server.plans[path] = ['drop', 'norange']  # the retry answers 200 with the whole file
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url)
    assert len(server.log) == 2 and server.log[1][1] is not None
    assert (tmp_path / 'fineweb_val_000000.bin').read_bytes() == server.files[path]


def test_download_retries_500_then_gives_up(server, tmp_path, monkeypatch):
    serve_fineweb(server, num_train=1)
    train = '/mirror/fineweb_train_000001.bin'
    server.plans[train] = ['500']
    prepare.download_dataset('fineweb10B', str(tmp_path), 1, base_url=server.url)
    assert [p for p, _ in server.log].count(train) == 2
    assert (tmp_path / 'fineweb_train_000001.bin').read_bytes() == server.files[train]
    monkeypatch.setattr(prepare, 'RETRIES', 3)
    (tmp_path / 'fineweb_train_000001.bin').unlink()
    server.plans[train] = ['500'] * 3
    with pytest.raises(PrepareError, match='train_000001.bin: download failed after 3 attempts, last: HTTP 500'):
        prepare.download_dataset('fineweb10B', str(tmp_path), 1, base_url=server.url)
    assert not (tmp_path / 'fineweb_train_000001.bin').exists()


def test_download_404_fails_clearly_without_retry(server, tmp_path, capsys):
    serve_fineweb(server, num_train=0)  # no train shard on the server
    with pytest.raises(SystemExit) as e:
        prepare.main([f'--base_url={server.url}', f'--data_dir={tmp_path}', '--num_train_shards=1'])
    assert e.value.code.startswith('error: fineweb_train_000001.bin: HTTP 404')  # sys.exit(str): status 1
    assert f'{server.url}/fineweb_train_000001.bin' in e.value.code and '\n' not in e.value.code
    assert '--revision' in e.value.code and '--base_url' in e.value.code
    assert [p for p, _ in server.log].count('/mirror/fineweb_train_000001.bin') == 1
    assert sorted(os.listdir(tmp_path)) == ['fineweb_val_000000.bin']


def test_cli_failure_is_one_line_without_traceback(server, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), f'--base_url={server.url}',
                          f'--data_dir={tmp_path}'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert 'error: fineweb_val_000000.bin: HTTP 404' in out.stderr and 'Traceback' not in out.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('served, problem', [
    (shard_bytes(range(500), magic=12345), 'bad magic number 12345'),
    (shard_bytes(range(500))[:1500], 'truncated file'),  # the server's own copy is cut short
    (b'<html>rate limited</html>', 'truncated file'),
], ids=['bad-magic', 'cut-short', 'html-page'])
def test_corrupt_download_is_never_renamed_into_place(server, tmp_path, served, problem):
    server.files['/mirror/fineweb_val_000000.bin'] = served
    with pytest.raises(PrepareError, match=f'deleted and not moved into place: .*{problem}'):
        prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url)
    assert os.listdir(tmp_path) == []  # neither the shard nor its .tmp


def test_download_stops_on_a_full_disk(server, tmp_path, monkeypatch):
    serve_fineweb(server, num_train=0)
    usage = type('Usage', (), {'free': 100})  # 100 bytes free: less than the 7 KB shard
    with monkeypatch.context() as m:
        m.setattr(prepare.shutil, 'disk_usage', lambda path: usage)
        with pytest.raises(PrepareError, match=r'fineweb_val_000000.bin: no space left on device '
                                               r'\(0 MB needed, 0 MB free\); no partial file was kept'):
            prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url)
    assert os.listdir(tmp_path) == []
    assert len(server.log) == 1  # no retries

    # the disk fills up during the transfer that would replace a good shard (its first 1,000 tokens by the
    # whole shard): stop at once, delete the partial download and keep the good shard as it was
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url, max_tokens=1000)
    good = (tmp_path / 'fineweb_val_000000.bin').read_bytes()
    calls = []
    def enospc(url, tmp, size):
        calls.append(url)
        Path(tmp).write_bytes(b'x' * 5000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(prepare, 'fetch', enospc)
    with pytest.raises(PrepareError) as e:
        prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url)
    assert str(e.value) == (f'{tmp_path / "fineweb_val_000000.bin"}: no space left on device; no partial file '
                            f'was kept, free some space and run again')
    assert len(calls) == 1
    assert os.listdir(tmp_path) == ['fineweb_val_000000.bin']
    assert (tmp_path / 'fineweb_val_000000.bin').read_bytes() == good

# -----------------------------------------------------------------------------
# --max_tokens: the first N tokens of each shard, by HTTP Range

def header(path):
    return np.fromfile(path, dtype='<i4', count=4).tolist()


def test_max_tokens_fetches_the_start_of_each_shard_with_range(server, tmp_path):
    names = serve_fineweb(server, num_train=1, n=3000)
    d = tmp_path / 'fw'
    run = lambda n: prepare.main([f'--base_url={server.url}', f'--data_dir={d}', f'--max_tokens={n}'])
    run(1000)
    # 1,000 tokens are the 1,024-byte header and 2,000 bytes: bytes 0 to 3,023
    assert server.log == [(f'/mirror/{name}', 'bytes=0-3023') for name in names]
    for name in names:
        served = np.frombuffer(server.files[f'/mirror/{name}'], dtype='<u2', offset=1024)
        assert (d / name).stat().st_size == 1024 + 2 * 1000
        assert header(d / name) == [20240520, 1, 1000, 3000]  # 1,000 tokens held, of a shard of 3,000
        np.testing.assert_array_equal(load_shard(str(d / name), vocab_size=50257), served[:1000])
    run(1000)  # the same N again: nothing fetched
    assert len(server.log) == 2
    run(500)  # another N: replaced
    assert server.log[2:] == [(f'/mirror/{name}', 'bytes=0-2023') for name in names]
    assert [header(d / name)[2:] for name in names] == [[500, 3000]] * 2
    run(0)  # whole shards: a cut shard is not one, so both are fetched whole
    assert server.log[4:] == [(f'/mirror/{name}', None) for name in names]
    assert all((d / name).read_bytes() == server.files[f'/mirror/{name}'] for name in names)
    run(1000)  # a whole shard is never cut down
    assert len(server.log) == 6
    assert sorted(os.listdir(d)) == sorted(names)


def test_max_tokens_beyond_the_shard_gets_the_whole_shard(server, tmp_path):
    serve_fineweb(server, num_train=0, n=3000)
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url, max_tokens=5000)
    assert server.log == [('/mirror/fineweb_val_000000.bin', 'bytes=0-11023')]  # answered with 7,024 bytes
    path = tmp_path / 'fineweb_val_000000.bin'
    assert path.read_bytes() == server.files['/mirror/fineweb_val_000000.bin'] and header(path)[3] == 0
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url, max_tokens=5000)
    assert len(server.log) == 1  # whole, so present


def test_max_tokens_reads_only_what_it_needs_when_the_server_ignores_range(server, tmp_path):
    path = '/mirror/fineweb_val_000000.bin'
    server.files[path] = shard_bytes(np.arange(16 * 2**20) % 50257)  # 16M tokens, 32 MB
    server.plans[path] = ['norange']  # a 200 with the whole file
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url, max_tokens=1000)
    assert server.log == [(path, 'bytes=0-3023')]
    assert load_shard(str(tmp_path / 'fineweb_val_000000.bin')).tolist() == list(range(1000))
    for _ in range(500):  # the server's thread ends when its write fails, after the client hung up
        if server.sent:
            break
        time.sleep(0.01)
    # the client stopped after 3,024 bytes; what got out is what the sockets' buffers hold (a few MB)
    assert server.sent[0] < len(server.files[path]) // 2


def test_max_tokens_resumes_a_dropped_connection_and_an_attempt_cut_before_its_rename(server, tmp_path):
    serve_fineweb(server, num_train=0, n=3000)
    path = '/mirror/fineweb_val_000000.bin'
    data = server.files[path]
    server.plans[path] = ['drop']
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url, max_tokens=1000)
    assert server.log == [(path, 'bytes=0-3023'), (path, 'bytes=1512-3023')]  # the rest of the range
    assert (tmp_path / 'fineweb_val_000000.bin').read_bytes()[1024:] == data[1024:3024]
    # a .tmp cut to 1,000 tokens by an attempt that stopped before its rename, now resumed for 2,000
    tmp = tmp_path / 'fineweb_val_000000.bin.tmp'
    tmp.write_bytes((tmp_path / 'fineweb_val_000000.bin').read_bytes())
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url, max_tokens=2000)
    assert server.log[2:] == [(path, 'bytes=3024-5023')]
    assert header(tmp_path / 'fineweb_val_000000.bin') == [20240520, 1, 2000, 3000]
    assert (tmp_path / 'fineweb_val_000000.bin').read_bytes()[1024:] == data[1024:5024]
    assert os.listdir(tmp_path) == ['fineweb_val_000000.bin']


def test_replacing_a_cut_shard_keeps_it_until_the_new_one_is_good(server, tmp_path, monkeypatch):
    serve_fineweb(server, num_train=0, n=3000)
    path = '/mirror/fineweb_val_000000.bin'
    prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url, max_tokens=1000)
    good = (tmp_path / 'fineweb_val_000000.bin').read_bytes()
    monkeypatch.setattr(prepare, 'RETRIES', 2)
    server.plans[path] = ['500', '500']
    with pytest.raises(PrepareError, match='download failed after 2 attempts'):
        prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url, max_tokens=2000)
    server.files[path] = b'<html>rate limited</html>'
    with pytest.raises(PrepareError, match='not a valid shard'):
        prepare.download_dataset('fineweb10B', str(tmp_path), 0, base_url=server.url)
    assert os.listdir(tmp_path) == ['fineweb_val_000000.bin']
    assert (tmp_path / 'fineweb_val_000000.bin').read_bytes() == good

# -----------------------------------------------------------------------------
# the options: a bad value stops the run with one line before anything is fetched or written

@pytest.mark.parametrize('argv, message', [
    (['--dataset=fineweb100B'], '--dataset=fineweb100B: expected fineweb10B or finewebedu10B'),
    (['--num_train_shards=-1'], '--num_train_shards=-1: expected 0 to 103 for fineweb10B'),
    (['--dataset=finewebedu10B', '--num_train_shards=100'], '--num_train_shards=100: expected 0 to 99'),
    (['--max_tokens=-5'], '--max_tokens=-5: expected a number of tokens >= 0'),
    (['--revision='], '--revision=: expected a branch or commit hash'),
    (['--base_url=http://x', '--revision=abc'], '--revision=abc: expected none with --base_url'),
    (['--base_url=example.com/data'], '--base_url=example.com/data: expected an http(s):// URL'),
    (['--name=toy'], '--name=toy: applies only with --text'),
    (['--val_fraction=0.2'], '--val_fraction=0.2: applies only with --text'),
    (['--text=a.txt', '--max_tokens=100'], '--max_tokens=100: applies only without --text'),
    (['--text=a.txt'], '--name=: expected a file name for the shards of --text'),
    (['--text=a.txt', '--name=sub/toy'], '--name=sub/toy: expected a file name'),
    (['--text=a.txt', '--name=toy', '--val_fraction=0'], '--val_fraction=0.0: expected in (0, 0.5]'),
    (['--text=a.txt', '--name=toy', '--val_fraction=1'], '--val_fraction=1.0: expected in (0, 0.5]'),
    (['--text=a.txt', '--name=toy', '--shard_size=0'], '--shard_size=0: expected in [1, 2^31 - 1]'),
    (['--text=a.txt', '--name=toy', '--num_proc=0'], '--num_proc=0: expected at least 1 process'),
    (['--text=a.txt,missing.jsonl', '--name=toy'], '--text: missing.jsonl: expected an existing .txt or .jsonl'),
    (['--text=a.txt,data.csv', '--name=toy'], '--text: data.csv: expected an existing .txt or .jsonl'),
    (['--data_dir=a.txt'], '--data_dir=a.txt: expected a folder, but '),
    (['--data_dir=a.txt/sub'], '--data_dir=a.txt/sub: expected a folder, but '),
    (['--num_train_shards=1.5'], 'num_train_shards expects int'),  # cli.py's own check
])
def test_bad_options_stop_with_one_line_before_any_download_or_write(server, tmp_path, monkeypatch, argv,
                                                                       message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a.txt').write_text('one\n<|endoftext|>\ntwo\n')
    (tmp_path / 'data.csv').write_text('a,b\n')
    serve_fineweb(server)
    if not any(a.startswith(('--base_url', '--text')) for a in argv):
        argv = [f'--base_url={server.url}', *argv]  # were a download to start, it would reach this server
    with pytest.raises(SystemExit) as e:
        prepare.main(argv)
    assert e.value.code.startswith('error: ') and message in e.value.code and '\n' not in e.value.code
    assert server.log == [] and sorted(os.listdir(tmp_path)) == ['a.txt', 'data.csv']


def test_bad_option_from_the_command_line_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), '--num_train_shards=200'],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == '' and os.listdir(tmp_path) == []
    assert out.stderr == 'error: --num_train_shards=200: expected 0 to 103 for fineweb10B\n'

# -----------------------------------------------------------------------------
# local text

class ByteBPE:
    """Stands in for GPT-2's BPE where the exact ids do not matter: one token per UTF-8 byte."""
    def encode_ordinary(self, text):
        return list(text.encode('utf-8'))


TXT = ('First doc line 1\nline 2\n<|endoftext|>\n\n<|endoftext|>\n'  # the empty document is skipped
       'Second doc mentions <|endoftext|> inline.\n<|endoftext|>\nThird doc\n')
JSONL = [{'text': 'alpha'}, None, {'text': ''}, {'text': 'beta gamma', 'id': 3}, {'text': 'δ unicode'},
         {'text': 'last'}]  # None: a blank line
DOCS = ['First doc line 1\nline 2\n', 'Second doc mentions <|endoftext|> inline.\n', 'Third doc\n',
        'alpha', 'beta gamma', 'δ unicode', 'last']


def write_inputs(tmp_path):
    (tmp_path / 'a.txt').write_text(TXT, encoding='utf-8')
    lines = ['' if obj is None else json.dumps(obj, ensure_ascii=False) for obj in JSONL]
    (tmp_path / 'b.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return [str(tmp_path / 'a.txt'), str(tmp_path / 'b.jsonl')]


def read_split(d, split):
    return [load_shard(p).tolist() for p in list_shards(str(d), split)]


def test_tokenize_txt_and_jsonl_into_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, '_enc', ByteBPE())
    inputs = write_inputs(tmp_path)
    assert list(prepare.iter_documents(inputs)) == DOCS
    out = tmp_path / 'data' / 'toy'
    prepare.main([f'--text={",".join(inputs)}', '--name=toy', f'--data_dir={out}',
                  '--val_fraction=0.3', '--shard_size=16', '--num_proc=1'])
    tokens = [[EOT] + list(doc.encode('utf-8')) for doc in DOCS]
    # 7 documents at 0.3: round(2.1) = 2 val documents, every 7 // 2 = 3rd one: documents 0 and 3
    val = [t for i, doc in enumerate(tokens) if i in (0, 3) for t in doc]
    train = [t for i, doc in enumerate(tokens) if i not in (0, 3) for t in doc]
    val_shards, train_shards = read_split(out, 'val'), read_split(out, 'train')
    assert sum(val_shards, []) == val and sum(train_shards, []) == train
    assert [len(s) for s in train_shards] == [16] * (len(train) // 16) + [len(train) % 16]
    assert sorted(os.listdir(out))[:2] == ['toy_train_000001.bin', 'toy_train_000002.bin']
    assert 'toy_val_000000.bin' in os.listdir(out) and not any(n.endswith('.tmp') for n in os.listdir(out))


@pytest.mark.parametrize('files, problem', [
    ({'one.txt': 'a single document\n'}, r'found 1 document\(s\) in .*one.txt, but val is held out by document'),
    ({'bad.jsonl': '{"text": "ok"}\n{"text": oops}\n'}, r'bad.jsonl:2: not valid JSON'),
    ({'bad.jsonl': '{"text": "ok"}\n["text"]\n'}, r"bad.jsonl:2: expected a JSON object with a string field 'text'"),
    ({'bad.jsonl': '{"body": "ok"}\n'}, r'bad.jsonl:1: expected a JSON object'),
    ({'data.csv': 'a,b\n'}, r'data.csv: expected an existing .txt or .jsonl file'),
    ({'latin1.txt': 'caf\xe9'.encode('latin-1')}, r'latin1.txt: not UTF-8 text'),
])
def test_tokenize_rejects_bad_inputs(tmp_path, monkeypatch, files, problem):
    monkeypatch.setattr(prepare, '_enc', ByteBPE())
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PrepareError, match=problem):
        prepare.tokenize_text([str(tmp_path / n) for n in files], 'toy', str(tmp_path / 'out'), num_proc=1)
    assert not (tmp_path / 'out').exists()


def test_tokenize_refuses_to_mix_with_existing_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, '_enc', ByteBPE())
    inputs = write_inputs(tmp_path)
    out = tmp_path / 'out'
    prepare.tokenize_text(inputs, 'toy', str(out), num_proc=1)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(PrepareError, match='already holds toy shards'):
        prepare.tokenize_text(inputs, 'toy', str(out), num_proc=1)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def gpt2_bpe():
    """tiktoken's r50k_base encoding, or a skip when its file is not in tiktoken's cache. The check comes
    first because without the file tiktoken tries to download it, with no timeout."""
    import tiktoken
    url = 'https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken'
    cache = (os.environ.get('TIKTOKEN_CACHE_DIR') or os.environ.get('DATA_GYM_CACHE_DIR')
             or os.path.join(tempfile.gettempdir(), 'data-gym-cache'))  # tiktoken's lookup order
    if not os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())):
        pytest.skip(f"GPT-2's BPE (tiktoken r50k_base) is not cached in {cache}; set TIKTOKEN_CACHE_DIR")
    return tiktoken.get_encoding('r50k_base')


def test_tokenize_with_the_real_gpt2_bpe_in_worker_processes(tmp_path, monkeypatch):
    enc = gpt2_bpe()
    monkeypatch.setattr(prepare, '_enc', None)  # prepare loads the BPE itself
    assert enc.encode_ordinary('Hello world') == [15496, 995]  # GPT-2's ids, not some other BPE's
    (tmp_path / 'a.txt').write_text('Hello world\n<|endoftext|>\nThe cat sat.\n', encoding='utf-8')
    (tmp_path / 'b.jsonl').write_text('{"text": "Hello world"}\n{"text": "<|endoftext|> stays text"}\n')
    writers = prepare.tokenize_text([str(tmp_path / 'a.txt'), str(tmp_path / 'b.jsonl')], 'gpt2toy',
                                    str(tmp_path / 'out'), val_fraction=0.25, num_proc=2)
    assert (writers['val'].docs, writers['train'].docs) == (1, 3)
    docs = ['Hello world\n', 'The cat sat.\n', 'Hello world', '<|endoftext|> stays text']
    tokens = [[EOT] + enc.encode_ordinary(doc) for doc in docs]
    assert read_split(tmp_path / 'out', 'val') == [tokens[0]]
    assert read_split(tmp_path / 'out', 'train') == [tokens[1] + tokens[2] + tokens[3]]
    assert tokens[2] == [EOT, 15496, 995] and tokens[3].count(EOT) == 1  # the literal in text is not EOT


def test_help_explains_how_txt_is_split():
    out = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), '--help'],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    help_text = ' '.join(out.stdout.split())
    assert 'A .txt file is split into documents at lines that hold only <|endoftext|>' in help_text
    assert '--text=notes.txt,more.jsonl --name=mydata' in help_text and '--max_tokens=1000000' in help_text
    for option in ['--num_train_shards=1', '--dataset=fineweb10B', '--base_url=', '--data_dir=', '--revision=main',
                   '--text=', '--name=', '--max_tokens=0', '--val_fraction=0.01', '--shard_size=', '--num_proc=']:
        assert option in help_text
