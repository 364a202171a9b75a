"""What the tests (and bench/) share: waiting with deadlines, homes, a real
``twistd qmail``, SMTP by hand, the one fake SMTP server, a DNS server from a
dict, and in-memory rigs for the protocols and the scheduler."""
