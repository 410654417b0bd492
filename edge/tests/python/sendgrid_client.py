"""Drives sluice's HTTP edge with the official SendGrid Python SDK (PyPI `sendgrid`).

Run by edge/tests/http_sendgrid_python.rs:

    python3 sendgrid_client.py MODE --port PORT --key KEY

MODE is one of:
  send      a Mail-helper send with attachments (one inline), cc/bcc and substitutions
  bad-key   a send with a key sluice does not know: expects UnauthorizedError
  invalid   a raw body that breaks several rules: expects BadRequestsError

Prints one JSON object on stdout describing what the SDK saw; exits non-zero when the SDK
did not behave as the mode expects.
"""

import argparse
import base64
import json
import sys

from python_http_client.exceptions import BadRequestsError, UnauthorizedError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (
    Attachment,
    Bcc,
    Category,
    Cc,
    ContentId,
    CustomArg,
    Disposition,
    FileContent,
    FileName,
    FileType,
    From,
    Header,
    Mail,
    Personalization,
    Substitution,
    To,
)

PDF = b"%PDF-1.4 sluice interop \x00\x01\x02\xff"
PNG = b"\x89PNG\r\n\x1a\n sluice logo"


def client(port, key):
    # No trailing slash: the SDK appends /v3/mail/send to the host as is.
    sg = SendGridAPIClient(api_key=key, host="http://127.0.0.1:%d" % port)
    sg.client.timeout = 30
    return sg


def personalization(to, subs, cc=None, bcc=None):
    p = Personalization()
    p.add_to(To(to))
    if cc:
        p.add_cc(Cc(cc, "Carbon Copy"))
    if bcc:
        p.add_bcc(Bcc(bcc))
    for key, value in subs.items():
        p.add_substitution(Substitution(key, value))
    return p


def send(sg):
    mail = Mail(
        from_email=From("sender@example.org", "Sluice Interop"),
        subject="Hello -name-",
        plain_text_content="Dear -name-, your code is -code-.",
        html_content='<p>Dear -name-, your code is <b>-code-</b>.</p><img src="cid:logo">',
    )
    mail.add_personalization(
        personalization("ada@example.com", {"-name-": "Ada", "-code-": "A1"}, cc="cc@example.net", bcc="hidden@example.com")
    )
    mail.add_personalization(personalization("bob@example.com", {"-name-": "Bob", "-code-": "B2"}))
    mail.add_attachment(
        Attachment(
            FileContent(base64.b64encode(PDF).decode()),
            FileName("invoice.pdf"),
            FileType("application/pdf"),
            Disposition("attachment"),
        )
    )
    mail.add_attachment(
        Attachment(
            FileContent(base64.b64encode(PNG).decode()),
            FileName("logo.png"),
            FileType("image/png"),
            Disposition("inline"),
            ContentId("logo"),
        )
    )
    mail.add_category(Category("interop"))
    mail.add_custom_arg(CustomArg("run", "python"))
    mail.add_header(Header("X-Interop", "sendgrid-python"))
    response = sg.send(mail)
    return {"status": response.status_code, "x_message_id": response.headers.get("X-Message-Id"), "body": response.body.decode()}


def bad_key(sg):
    body = {
        "personalizations": [{"to": [{"email": "a@example.com"}]}],
        "from": {"email": "sender@example.org"},
        "subject": "x",
        "content": [{"type": "text/plain", "value": "x"}],
    }
    try:
        sg.client.mail.send.post(request_body=body)
    except UnauthorizedError as e:
        return {"status": e.status_code, "body": json.loads(e.body)}
    raise SystemExit("expected UnauthorizedError for an unknown key")


def invalid(sg):
    body = {
        "personalizations": [{"to": [{"email": "not-an-address"}]}, {"cc": [{"email": "c@example.com"}]}],
        "from": {"email": "sender@example.org"},
        "content": [{"type": "text/plain", "value": "x"}],
    }
    try:
        sg.client.mail.send.post(request_body=body)
    except BadRequestsError as e:
        return {"status": e.status_code, "body": e.to_dict}
    raise SystemExit("expected BadRequestsError for an invalid body")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["send", "bad-key", "invalid"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    sg = client(args.port, args.key)
    result = {"send": send, "bad-key": bad_key, "invalid": invalid}[args.mode](sg)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
