#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets to tests/fuzz/corpus/<target>/
(or to the directory given as the first argument); run.sh calls it.

router: every SQL string literal of the integration tests (tests/*.rs: the
router table cases, the proxy, COPY, 2PC and fan-out tests) and of
tests/compat. frontend_decoder: the messages real clients send (psql's and
pgbench's startup, SSLRequest, CancelRequest, simple Query, pgbench -M
extended's Parse/Bind/Describe/Execute/Sync, Close, password and SASL
messages), each prefixed by the mode byte the target reads. copy_framer: the
text, CSV and binary COPY data the COPY tests send, prefixed by the option
bytes the target reads.
Deterministic: rerun after editing; the files are named by content hash.
"""
import glob
import hashlib
import os
import re
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus")


def write(target, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


SQL_START = re.compile(r"^\s*(/\*|select|insert|update|delete|copy|begin|commit|rollback|with|create|alter|drop|"
                       r"set|prepare|execute|deallocate|truncate|savepoint|release|start|show|explain|table|values|"
                       r"lock|vacuum|analyze|do|grant|revoke|comment|listen|notify|reset|discard|declare|fetch|close|move)\b",
                       re.I)


def rust_strings(text):
    # "..." with escapes, and r"..." / r#"..."# raw strings.
    for m in re.finditer(r'r(#*)"(.*?)"\1', text, re.S):
        yield m.group(2)
    for m in re.finditer(r'(?<![r#])"((?:[^"\\]|\\.)*)"', text, re.S):
        s = m.group(1)
        s = s.replace("\\n", "\n").replace("\\t", "\t").replace('\\"', '"').replace("\\\\", "\\")
        s = re.sub(r"\\\n\s*", "", s)
        yield s


def router_seeds():
    seen = set()
    files = glob.glob(os.path.join(ROOT, "tests", "*.rs")) + glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True)
    for path in files:
        with open(path, errors="replace") as f:
            text = f.read()
        for s in rust_strings(text):
            if SQL_START.match(s) and s not in seen and len(s) < 4000:
                seen.add(s)
                write("router", s.encode())
    return len(seen)


def msg(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


def startup(params):
    body = struct.pack("!i", 196608) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def frontend_seeds():
    n = 0
    ssl = struct.pack("!ii", 8, 80877103)
    gss = struct.pack("!ii", 8, 80877104)
    cancel = struct.pack("!iiii", 16, 80877102, 1000123, 0x1234abcd)
    psql = startup([("user", "postgres"), ("database", "app"), ("application_name", "psql"),
                    ("client_encoding", "UTF8")])
    pgb = startup([("user", "postgres"), ("database", "bench"), ("application_name", "pgbench"),
                   ("options", "-c extra_float_digits=3")])
    pw = msg(b"p", cstr("secret"))
    md5 = msg(b"p", cstr("md5" + "0" * 32))
    sasl_init = msg(b"p", cstr("SCRAM-SHA-256") + struct.pack("!i", 28) + b"n,,n=,r=rOprNGfwEbeRWgbNEkqO")
    sasl_resp = msg(b"p", b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    sel = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    parse = msg(b"P", cstr("") + cstr(sel) + struct.pack("!hi", 1, 23))
    bind = msg(b"B", cstr("") + cstr("") + struct.pack("!hh", 0, 1) + struct.pack("!i", 5) + b"42133" + struct.pack("!h", 0))
    bind_bin = msg(b"B", cstr("p1") + cstr("s1") + struct.pack("!hh", 1, 1) + struct.pack("!hi", 1, 8) + struct.pack("!q", 7) + struct.pack("!hh", 1, 1))
    describe = msg(b"D", b"P" + cstr(""))
    describe_s = msg(b"D", b"S" + cstr("s1"))
    execute = msg(b"E", cstr("") + struct.pack("!i", 0))
    sync = msg(b"S", b"")
    close = msg(b"C", b"S" + cstr("s1"))
    flush = msg(b"H", b"")
    terminate = msg(b"X", b"")
    queries = ["BEGIN;", "UPDATE pgbench_accounts SET abalance = abalance + -4061 WHERE aid = 83118;",
               "SELECT abalance FROM pgbench_accounts WHERE aid = 83118;", "END;",
               "/* shardgate: shard=s1 */ SELECT 1", "SET shardgate.sharding_key = '42'",
               "COPY users (id, name) FROM STDIN (FORMAT csv)", "select 'M\xfcller'"]
    simple = [msg(b"Q", q.encode("latin-1", "replace") + b"\0") for q in queries]
    copy = msg(b"d", b"1\talice\n2\tbob\n") + msg(b"c", b"") + msg(b"f", cstr("client gave up"))
    backend = (msg(b"Z", b"I") + msg(b"E", b"SERROR\0C40001\0Mcould not serialize\0\0") +
               msg(b"C", cstr("SELECT 1")) + msg(b"S", cstr("client_encoding") + cstr("UTF8")))
    ext = parse + bind + describe + execute + sync
    cases = [
        (0, ssl), (0, gss), (0, cancel), (0, psql), (0, pgb), (0, ssl + psql),
        (1, psql), (1, pgb + pw), (1, cancel), (1, psql + md5), (4, psql + sasl_init + sasl_resp),
        (2, ext), (2, ext * 3), (2, parse + bind_bin + describe_s + execute + close + sync),
        (2, b"".join(simple)), (2, copy), (2, flush + terminate), (2, backend),
        (5, sasl_init), (8, sasl_resp), (2, pw),
    ]
    for mode, data in cases:
        write("frontend_decoder", bytes([mode]) + data)
        n += 1
    for q in simple:
        write("frontend_decoder", bytes([2]) + q)
        n += 1
    return n


def copy_seeds():
    n = 0
    text = b"1\talice\t\\N\n2\tbob\\tby\t3\n3\tc\\\\d\t\\x41\n\\.\n"
    csv = b'id,name,v\n1,"a,b",3\n2,"multi\nline",\n3,"quo""te",\\N\n'
    crlf = b"1\tx\t1\r\n2\ty\t2\r\n"
    binary = (b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0) +
              struct.pack("!h", 3) + struct.pack("!i", 8) + struct.pack("!q", 1) + struct.pack("!i", 3) + b"abc" + struct.pack("!i", -1) +
              struct.pack("!h", 3) + struct.pack("!i", 8) + struct.pack("!q", 2) + struct.pack("!i", 0) + struct.pack("!i", 4) + b"\0\0\0\x07" +
              b"\xff\xff")
    # head: format, flags, delimiter/quote, escape/null, columns+key, cuts
    for head, data in [
        (bytes([0, 0, 0, 0, 2, 9]), text),
        (bytes([0, 1, 0, 0, 2, 33]), b"id\tname\tv\n" + text),
        (bytes([0, 0, 0, 0, 2, 5]), crlf),
        (bytes([1, 1, 0, 0, 2, 17]), csv),
        (bytes([1, 0, 0, 0, 6, 3]), csv[10:]),
        (bytes([1, 16, 0, 0, 2, 1]), b'1,,\n2,"",x\n'),
        (bytes([1, 32 | 64, 0, 0x10, 2, 7]), b'1,"",x\n,2,3\n'),
        (bytes([2, 0, 0, 0, 2, 11]), binary),
        (bytes([2, 0, 0, 0, 6, 40]), binary),
        (bytes([0, 2, 2, 0, 1, 2]), b"1|a|b\n2|c|d\n"),
    ]:
        write("copy_framer", head + data)
        n += 1
    return n


if __name__ == "__main__":
    print(f"router: {router_seeds()} seeds, frontend_decoder: {frontend_seeds()}, copy_framer: {copy_seeds()}")
