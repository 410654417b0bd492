"""Injects mail into a running sluice with real clients, for the end-to-end tests.

    python3 inject.py http  --host http://127.0.0.1:PORT --key KEY   < requests.json
    python3 inject.py smtp  --port PORT [--starttls --user U --password P] < messages.json

http: stdin is a JSON list of SendGrid v3 request bodies, sent one by one with the official
`sendgrid` SDK (SendGridAPIClient(..., host=...)). smtp: stdin is a JSON list of
{"from": ..., "to": [...], "data": "..."} sent over one smtplib session each.

Prints one line per request as soon as it is answered, flushed, so a test that kills sluice
midway knows exactly what was acknowledged:
    ACK <index> <x-message-id or smtp reply>
    ERR <index> <status> <body>
"""

import argparse
import json
import smtplib
import ssl
import sys


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def http(args, requests):
    from python_http_client.exceptions import HTTPError
    from sendgrid import SendGridAPIClient

    sg = SendGridAPIClient(api_key=args.key, host=args.host)
    for i, body in enumerate(requests):
        try:
            resp = sg.client.mail.send.post(request_body=body, timeout=30)
            out(f"ACK {i} {resp.headers.get('X-Message-Id')}")
        except HTTPError as e:
            out(f"ERR {i} {e.status_code} {e.body.decode(errors='replace')}")
        except Exception as e:  # connection refused / reset: sluice is gone
            out(f"ERR {i} conn {e!r}")
            if args.stop_on_connection_error:
                return


def smtp(args, messages):
    for i, m in enumerate(messages):
        try:
            with smtplib.SMTP("127.0.0.1", args.port, timeout=30) as s:
                s.ehlo("client.test")
                if args.starttls:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                    s.starttls(context=ctx)
                    s.ehlo("client.test")
                if args.user:
                    s.login(args.user, args.password)
                refused = s.sendmail(m["from"], m["to"], m["data"].encode())
                out(f"ACK {i} {json.dumps(refused)}")
        except smtplib.SMTPResponseException as e:
            out(f"ERR {i} {e.smtp_code} {e.smtp_error.decode(errors='replace')}")
        except smtplib.SMTPRecipientsRefused as e:
            out(f"ERR {i} rcpt {e.recipients!r}")
        except Exception as e:
            out(f"ERR {i} conn {e!r}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["http", "smtp"])
    p.add_argument("--host")
    p.add_argument("--key")
    p.add_argument("--port", type=int)
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--stop-on-connection-error", action="store_true")
    args = p.parse_args()
    items = json.load(sys.stdin)
    (http if args.mode == "http" else smtp)(args, items)


if __name__ == "__main__":
    main()
