"""Verifies every DKIM signature of a message with dkimpy, an implementation sluice did not
write, looking the public keys up over real DNS (the test DNS server) with dnspython.

    python3 dkim_verify.py --dns 127.0.0.1:PORT < message.eml

Prints one line per DKIM-Signature header, in order:
    <pass|fail> d=<domain> s=<selector> a=<algorithm> <detail>
and exits 0 (the test judges the lines). Ed25519 needs PyNaCl (scripts/test.sh installs it).
"""

import argparse
import sys

import dkim
import dns.message
import dns.query
import dns.rdatatype


def txt_lookup(server, port):
    def lookup(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        answer = dns.query.udp(query, server, timeout=timeout, port=port)
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                # A long record arrives as several strings; the key is their concatenation.
                return b"".join(list(rrset.items)[0].strings)
        return None

    return lookup


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dns", required=True, help="ip:port of the DNS server holding the keys")
    args = p.parse_args()
    server, port = args.dns.rsplit(":", 1)
    message = sys.stdin.buffer.read()
    lookup = txt_lookup(server, int(port))

    d = dkim.DKIM(message)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    if count == 0:
        print("none")
    for i in range(count):
        v = dkim.DKIM(message)
        try:
            ok = v.verify(idx=i, dnsfunc=lookup)
            detail = "" if ok else "signature did not verify"
        except dkim.DKIMException as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        tags = v.signature_fields or {}
        field = lambda t: tags.get(t, b"?").decode(errors="replace")
        print(f"{'pass' if ok else 'fail'} d={field(b'd')} s={field(b's')} a={field(b'a')} {detail}".rstrip())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
