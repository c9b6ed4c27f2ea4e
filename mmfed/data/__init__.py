"""Site data: reading, checking and synthesizing hospital site folders."""

from mmfed.data.reader import ReadResult, SiteData, list_sites, load_site, read_site, summarize
from mmfed.data.sitespec import SiteSpec, parse_site_spec

__all__ = ["ReadResult", "SiteData", "SiteSpec", "list_sites", "load_site", "parse_site_spec",
           "read_site", "summarize"]
