"""A DNS server for tests: answers from a dictionary zone on 127.0.0.1 in a
thread (dnspython), so MX, SPF and DNSBL look-ups never leave the machine."""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset


class ZoneServer:
    """Answers A/AAAA/MX/CNAME from ``zone`` (name -> type -> rdata texts) on
    127.0.0.1 in a thread; unknown names get NXDOMAIN, ``servfail`` names SERVFAIL.
    CNAMEs are followed inside the answer, as a recursive server does."""

    def __init__(self, zone: dict[str, dict[str, list[str]]], servfail: frozenset[str] = frozenset()) -> None:
        self.zone = {name.rstrip(".").lower(): records for name, records in zone.items()}
        self.servfail = servfail
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.sock.getsockname()
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"stop", self.address)
        self.thread.join(10)
        self.sock.close()

    def _serve(self) -> None:
        while True:
            wire, client = self.sock.recvfrom(65535)
            if self.stopping:
                return
            query = dns.message.from_wire(wire)
            self.sock.sendto(self._answer(query).to_wire(), client)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        question = query.question[0]
        rdtype = dns.rdatatype.to_text(question.rdtype)
        name = question.name
        while True:
            key = name.to_text(omit_final_dot=True).lower()
            if key in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            records = self.zone.get(key)
            if records is None:
                if name == question.name:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return response
            if "CNAME" in records and rdtype != "CNAME":
                target = records["CNAME"][0]
                response.answer.append(dns.rrset.from_text_list(name, 60, "IN", "CNAME", [target]))
                name = dns.name.from_text(target)
                continue
            if rdtype in records:
                response.answer.append(dns.rrset.from_text_list(name, 60, "IN", rdtype, records[rdtype]))
            return response
