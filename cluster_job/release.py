"""Released CLIP embeddings as published: where the three folders are, which files make one part, and reading
a part's features (rom1504's embedding-reader) and metadata columns (pyarrow), local or any fsspec URL.

Layouts read (folder names detected, or named by `import.folders.*`):
- LAION-400M's release: `images/img_emb_N.npy`, `texts/text_emb_N.npy`, `metadata/metadata_N.parquet`;
- clip-retrieval's output (and its mirrors of LAION-400M): `img_emb/`, `text_emb/`, `metadata/`;
- LAION-5B's subsets: `img_emb/`, `text_emb/` and a metadata folder named after the subset
  (`laion2B-en-metadata/`), N zero-padded (`img_emb_0000.npy`).
Part N is img_emb_N.npy, text_emb_N.npy and metadata_N.parquet, paired by N, never by list position.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from unicom_ds.config import ConfigError

CANDIDATES = {"img": ("img_emb", "images"), "text": ("text_emb", "texts"), "metadata": ("metadata",)}
PREFIX = {"img": "img_emb", "text": "text_emb", "metadata": "metadata"}
SUFFIX = {"img": "npy", "text": "npy", "metadata": "parquet"}


@dataclass(frozen=True)
class Part:
    name: str        # N of img_emb_N.npy
    start: int       # first row in embedding-reader's global numbering
    count: int
    metadata: str    # path of metadata_N.parquet


def fs_of(folder: str):
    import fsspec

    return fsspec.core.url_to_fs(folder)


def numbered(names, kind: str) -> dict[str, str]:
    """{N: name} of the files `<prefix>_N.<suffix>` among `names` (base names or paths)."""
    pattern = re.compile(rf"{PREFIX[kind]}_(\w+)\.{SUFFIX[kind]}")
    found = {}
    for name in names:
        m = pattern.fullmatch(PurePosixPath(name).name)
        if m:
            found[m.group(1)] = name
    return found


def pick(kind: str, subfolders: dict[str, list[str]]) -> str | None:
    """The subfolder holding `kind`: a known name, else the one subfolder holding `<prefix>_N` files (LAION-5B's
    `laion2B-en-metadata/`). `subfolders`: {name: its file names}."""
    for name in CANDIDATES[kind]:
        if name in subfolders:
            return name
    holding = [s for s, files in subfolders.items() if numbered(files, kind)]
    return holding[0] if len(holding) == 1 else None


def detect(folder: str, named: dict | None = None) -> dict[str, str]:
    """{img, text, metadata: folder path} under `folder`, each as named (import.folders.*) or detected."""
    named = {k: v for k, v in (named or {}).items() if v}
    fs, root = fs_of(folder)
    try:
        subfolders = {PurePosixPath(p).name: fs.ls(p, detail=False)
                      for p in sorted(fs.ls(root, detail=False)) if fs.isdir(p)}
    except OSError as e:
        raise ConfigError(f"embed.source={folder}: cannot list it ({e})") from None
    found = {}
    for kind in CANDIDATES:
        sub = named.get(kind) or pick(kind, subfolders)
        if sub is None or sub not in subfolders:
            what = f"import.folders.{kind}={sub} not" if kind in named else f"no {kind} folder (named " \
                   f"{' or '.join(CANDIDATES[kind])}, or the one holding {PREFIX[kind]}_N.{SUFFIX[kind]})"
            raise ConfigError(f"embed.source={folder}: {what} among its folders "
                              f"({', '.join(subfolders) or 'none'}); name them with import.folders.img, "
                              "import.folders.text, import.folders.metadata")
        found[kind] = f"{str(folder).rstrip('/')}/{sub}"
    return found


def describe(folders: dict[str, str]) -> str:
    return ", ".join(f"{k} {PurePosixPath(v).name}/" for k, v in folders.items())


class Release:
    """One released embedding folder: its parts (checked to pair and to align) and readers for each."""

    def __init__(self, folder: str, named: dict | None = None):
        from embedding_reader import EmbeddingReader

        self.folder = str(folder).rstrip("/")
        self.folders = detect(self.folder, named)
        try:
            self.img = EmbeddingReader(self.folders["img"], file_format="npy")
            self.txt = EmbeddingReader(self.folders["text"], file_format="npy")
        except (OSError, ValueError, IndexError) as e:
            raise ConfigError(f"embed.source={folder}: cannot read the embeddings in {describe(self.folders)} "
                              f"({type(e).__name__}: {e})") from None
        self.dim = int(self.img.dimension)
        self.parts = self._parts()
        self.columns = self._columns()

    def _parts(self) -> list[Part]:
        fs, meta_root = fs_of(self.folders["metadata"])
        meta = numbered(fs.ls(meta_root, detail=False), "metadata")
        img, txt = self._by_number(self.img, "img"), self._by_number(self.txt, "text")
        if self.txt.dimension != self.dim:
            raise ConfigError(f"embed.source={self.folder}: image features of d={self.dim} but text features of "
                              f"d={self.txt.dimension}")
        for kind, have in (("text", txt), ("metadata", meta)):
            missing = sorted(set(img) - set(have))
            if missing:
                raise ConfigError(f"embed.source={self.folder}: {PREFIX[kind]}_{missing[0]}.{SUFFIX[kind]} missing "
                                  f"from {PurePosixPath(self.folders[kind]).name}/ (img_emb_{missing[0]}.npy has it "
                                  f"as its pair){f', and {len(missing) - 1} more' if len(missing) > 1 else ''}")
            extra = sorted(set(have) - set(img))
            if extra:
                raise ConfigError(f"embed.source={self.folder}: {PREFIX[kind]}_{extra[0]}.{SUFFIX[kind]} has no "
                                  f"img_emb_{extra[0]}.npy in {PurePosixPath(self.folders['img']).name}/")
        parts = []
        for n in img:
            a, b = img[n], txt[n]
            if a.count != b.count:
                raise ConfigError(f"embed.source={self.folder}: img_emb_{n}.npy holds {a.count} rows but "
                                  f"text_emb_{n}.npy {b.count}; image and text rows must align")
            parts.append(Part(n, int(a.count_before), int(a.count), f"{self.folders['metadata']}/"
                              f"{PurePosixPath(meta[n]).name}"))
        return parts

    def _by_number(self, reader, kind: str) -> dict:
        """{N: embedding-reader's header row} of one embedding folder; a file not named <prefix>_N.npy is named."""
        found = {}
        for row in reader.reader.headers.itertuples():
            n = next(iter(numbered([row.filename], kind)), None)
            if n is None:
                raise ConfigError(f"embed.source={self.folder}: {row.filename} is not named {PREFIX[kind]}_N.npy")
            found[n] = row
        return found

    def _columns(self) -> list[str]:
        import pyarrow.parquet as pq

        fs, _ = fs_of(self.folder)
        with fs.open(self.parts[0].metadata, "rb") as f:
            return pq.read_schema(f).names

    def metadata(self, part: Part, columns: list[str]):
        """The named columns of a part's metadata (a pyarrow Table), checked to hold the part's rows."""
        import pyarrow.parquet as pq

        fs, _ = fs_of(self.folder)
        with fs.open(part.metadata, "rb") as f:
            table = pq.read_table(f, columns=columns)
        if table.num_rows != part.count:
            raise ValueError(f"{part.metadata} holds {table.num_rows} rows but img_emb_{part.name}.npy {part.count}")
        return table

    def batches(self, part: Part, batch_size: int):
        """(first row in the part, img [b, d] float32, txt [b, d] float32), batch by batch."""
        end = part.start + part.count
        common = dict(start=part.start, end=end, show_progress=False, max_ram_usage_in_bytes=2**28)
        for (img, meta), (txt, tmeta) in zip(self.img(batch_size, **common), self.txt(batch_size, **common)):
            if meta["i"].iloc[0] != tmeta["i"].iloc[0] or len(img) != len(txt):
                raise RuntimeError(f"img_emb_{part.name} and text_emb_{part.name} batches out of step")
            yield int(meta["i"].iloc[0]) - part.start, np.asarray(img), np.asarray(txt)
