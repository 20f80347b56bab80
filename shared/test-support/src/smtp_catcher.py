"""Handler of the tests' SMTP server (test_support::smtp), for aiosmtpd's `--class`.

Keeps every accepted message as two files in DIRECTORY/mail: NAME.eml, the raw bytes, then
NAME.json, the envelope with the headers and bodies Python's email package parsed. Each file
appears whole (written aside, then renamed), the .json last, so a reader that lists the .json
files sees complete messages only. NAMEs sort in the order the messages arrived.

Answers each RCPT TO as DIRECTORY/recipients says, read at every RCPT so the tests change it
while the server runs: lines `CODE ADDRESS`, the last one for an address holding; 550 refuses
the address, 451 defers it, anything else (or no line) accepts it.

While DIRECTORY/hold exists, a message is kept as above but the final reply to its DATA is held
back until the file goes: the server has the message and the client does not know it yet, the
moment a sender can crash between the two.
"""

import asyncio

import email
import email.policy
import itertools
import json
import os
import time


class Catcher:
    def __init__(self, directory):
        self.mail = os.path.join(directory, "mail")
        self.recipients = os.path.join(directory, "recipients")
        self.hold = os.path.join(directory, "hold")
        self.sequence = itertools.count()
        os.makedirs(self.mail, exist_ok=True)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("the catcher's handler takes one argument: its directory")
        return cls(args[0])

    def code_for(self, address):
        try:
            with open(self.recipients, encoding="utf-8") as rules:
                lines = rules.read().splitlines()
        except FileNotFoundError:
            return None
        code = None
        for line in lines:
            rule_code, _, rule_address = line.partition(" ")
            if rule_address.casefold() == address.casefold():
                code = rule_code
        return code

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        code = self.code_for(address)
        if code == "550":
            return f"550 5.1.1 <{address}>: recipient refused"
        if code == "451":
            return f"451 4.2.0 <{address}>: recipient deferred, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        parsed = {
            "envelope_from": envelope.mail_from,
            "envelope_to": list(envelope.rcpt_tos),
            "message_id": header(message, "Message-ID"),
            "subject": header(message, "Subject"),
            "to": addresses(message, "To"),
            "text": body(message, "plain"),
            "html": body(message, "html"),
        }
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self.sequence):06d}"
        write(os.path.join(self.mail, name + ".eml"), raw)
        write(
            os.path.join(self.mail, name + ".json"),
            json.dumps(parsed, ensure_ascii=False).encode("utf-8"),
        )
        while os.path.exists(self.hold):
            await asyncio.sleep(0.05)
        return "250 OK: kept"


def header(message, name):
    value = message.get(name)
    return None if value is None else str(value).strip()


def addresses(message, name):
    value = message.get(name)
    if value is None:
        return []
    return [address.addr_spec for address in value.addresses]


def body(message, subtype):
    """The decoded text of the message's text/SUBTYPE body, lines ending in \\n."""
    part = message.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    return part.get_content().replace("\r\n", "\n")


def write(path, data):
    partial = path + ".partial"
    with open(partial, "wb") as file:
        file.write(data)
    os.replace(partial, path)
