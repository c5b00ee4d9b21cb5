"""The stage cache reads only files inside the search folder: a link planted in an entry is refused."""
import json

import pytest

from compress.errors import CompressError
from compress.search.cache import StageCache, prefix_key


def test_a_cached_model_that_links_out_of_the_search_folder_is_refused(search_doc, tmp_path):
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes(b"not ours")
    cache = StageCache(tmp_path / "search" / "cache")
    entry = cache.root / prefix_key(search_doc, 0)
    entry.mkdir(parents=True)
    (entry / "entry.json").write_text(json.dumps({"stages": 1, "seconds": 1.0}))
    (entry / "model.pt").symlink_to(outside)
    with pytest.raises(CompressError, match=r"search cache file: .*model.pt resolves outside"):
        cache.load(search_doc, len(search_doc["stages"]), state=None)
    assert cache.hits == 0
