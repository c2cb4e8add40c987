"""One site vocabulary: ``Site(layer, stream)`` and its one string form ``"img_3"``."""

from __future__ import annotations

import re

import pytest

from difract_ext.flux.sites import Site, SiteError, as_site, as_site_dict


def test_string_form_round_trips() -> None:
    for layer in (0, 3, 18, 123):
        for stream in ("img", "txt"):
            site = Site(layer, stream)
            assert Site.parse(str(site)) == site == as_site(str(site)) == as_site((layer, stream))
    assert str(Site(3, "img")) == "img_3" and Site.parse(" txt_0 ") == Site(0, "txt")
    assert sorted([Site(1, "txt"), Site(0, "img"), Site(1, "img")]) == [
        Site(0, "img"),
        Site(1, "img"),
        Site(1, "txt"),
    ]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "3:img",
            "not a site: '3:img'; write a site as 'img_3' (stream_layer), i.e. Site(3, 'img')",
        ),
        ("3.img", "not a site: '3.img'"),
        ("transformer_blocks.3.ff", "not a site: 'transformer_blocks.3.ff'"),
        ("img3", "not a site: 'img3'"),
        ("img_-1", "not a site: 'img_-1'"),
        ("vid_3", "unknown stream 'vid'; streams are 'img'"),
        ("single_0", "transcoders on single-stream blocks are not supported"),
    ],
)
def test_parse_refuses_other_spellings(key: str, message: str) -> None:
    with pytest.raises(SiteError, match=re.escape(message)):
        Site.parse(key)


def test_tuples_and_bad_layers() -> None:
    with pytest.raises(
        SiteError,
        match=re.escape(
            "('img', 3) is a (stream, layer) tuple; sites are keyed "
            "Site(layer, stream): use Site(3, 'img') or the string 'img_3'"
        ),
    ):
        as_site(("img", 3))
    for bad in [(3,), (3, "img", 0), 3, None, (True, "img")]:
        with pytest.raises(SiteError, match="cannot read a site from"):
            as_site(bad)
    for layer in (-1, 1.5, True, "3"):
        with pytest.raises(SiteError, match="layer must be a non-negative int"):
            Site(layer, "img")  # type: ignore[arg-type]
    with pytest.raises(SiteError, match=r"two entries for site img_0"):
        as_site_dict({"img_0": 1, Site(0, "img"): 2})
    assert as_site_dict({"img_0": 1, (1, "txt"): 2}) == {Site(0, "img"): 1, Site(1, "txt"): 2}
