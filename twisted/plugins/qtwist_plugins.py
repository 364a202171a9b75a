"""The plugins qtwist ships, for Twisted's plugin system (control/plugins enables them)."""

from qtwist.plugins.chkuser import ChkUser
from qtwist.plugins.dkim import DKIM
from qtwist.plugins.rbl import RBL
from qtwist.plugins.scanning import ClamAV, SpamAssassin
from qtwist.plugins.spf import SPF

rbl = RBL()
spf = SPF()
chkuser = ChkUser()
dkim = DKIM()
spamassassin = SpamAssassin()
clamav = ClamAV()
