"""The files a researcher looks for first: the license the metadata names, how to cite, what
changed; they agree with the package's version and metadata."""

from __future__ import annotations

import configparser
from pathlib import Path

import yaml

import textenvs

ROOT = Path(__file__).resolve().parent.parent


def test_the_license_file_is_the_one_the_metadata_names():
    metadata = configparser.ConfigParser()
    metadata.read(ROOT / "setup.cfg")
    assert metadata["metadata"]["license"] == "Apache-2.0"
    assert metadata["metadata"]["license_files"].strip() == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_citation_cff_names_this_version_and_license():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert citation["version"] == textenvs.__version__
    assert citation["license"] == "Apache-2.0"
    assert citation["title"].startswith("textenvs") and citation["authors"]


def test_the_changelog_has_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert f"## [{textenvs.__version__}]" in text


def test_the_source_distribution_ships_them():
    manifest = (ROOT / "MANIFEST.in").read_text()
    for name in ("LICENSE", "CHANGELOG.md", "CITATION.cff"):
        assert name in manifest
