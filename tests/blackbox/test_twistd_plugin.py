"""`twistd qmail` is found through Twisted's plugin system, even where the
plugin cache (dropin.cache) cannot be written, as in a read-only site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LIST_PLUGINS = """
import sys
sys.path.insert(0, sys.argv[1])
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
import twisted.plugins
print(sorted(p.tapname for p in getPlugins(IServiceMaker, twisted.plugins)))
"""


def test_qmail_plugin_is_listed_when_the_plugin_cache_cannot_be_written(tmp_path):
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    shutil.copy(REPO / "twisted" / "plugins" / "qtwist_qmail.py", plugins)
    (plugins / "dropin.cache").mkdir()  # writing the cache file now fails, as on a read-only disk
    listed = subprocess.run([sys.executable, "-c", LIST_PLUGINS, str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "'qmail'" in listed.stdout, listed.stdout


def test_plugins_directory_has_no_init_file():
    # An __init__.py would make this directory shadow Twisted's own twisted.plugins package.
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()
    assert not (REPO / "twisted" / "__init__.py").exists()
