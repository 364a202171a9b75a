"""The plugins qtwist ships (rbl, spf, chkuser, dkim); each module holds one,
registered with Twisted's plugin system by twisted/plugins/qtwist_plugins.py."""
