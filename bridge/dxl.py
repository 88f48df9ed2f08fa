"""Read a Domino DXL export of a mail database, streaming (I/O: reads the export file).

``<database xmlns='http://www.lotus.com/dxl'>`` holds ``<document form='Memo'>`` elements; each is
parsed with defusedxml's iterparse and cleared once converted, so a multi-gigabyte export needs the
memory of one document. Folder membership is not in the documents' bodies: it comes from their
``$FolderRefs`` item (with folder references enabled on the database) resolved through the
``<folder>`` design notes of the same export, or from a membership file (UNID;folder lines, or the
folder views exported as ReadViewEntries XML, one file per folder), else from Domino's view rules
(Sent, Drafts, Inbox). A truncated or malformed export yields what was whole before the damage and
one ``SourceDamage`` where it stopped.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from defusedxml.ElementTree import iterparse

from balf.bridge.errors import SourceRefused
from balf.bridge.model import Role, SourceDamage, SourceFolder, SourceItem, SourceMessage
from balf.bridge.notes import Attachment, NotesDocument, convert_document, default_role_hint

NS = "{http://www.lotus.com/dxl}"
_VALUE_TAGS = {"text", "datetime", "number"}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _item_values(item: Any) -> tuple[str, ...]:
    """Every value of an item: ``<text>``, ``<datetime>``, ``<number>``, also inside ``<textlist>``,
    ``<datetimelist>`` (and its ``<datetimepair>``) and ``<numberlist>``."""
    return tuple(_value_text(element) for element in item.iter() if _local(element.tag) in _VALUE_TAGS)


def _value_text(element: Any) -> str:
    # DTD: text ( #PCDATA | break | nonxmlchar )*: a line break, or a character XML cannot carry
    parts = [element.text or ""]
    for child in element:
        tag = _local(child.tag)
        if tag == "break":
            parts.append("\n")
        elif tag == "nonxmlchar":
            try:
                parts.append(chr(int(child.get("value") or "", 16)))
            except ValueError:
                pass
        parts.append(child.tail or "")
    return "".join(parts)


def _richtext_paragraphs(richtext: Any) -> tuple[str, ...]:
    paragraphs: list[str] = []
    for par in richtext.iter():
        if _local(par.tag) != "par":
            continue
        chunks: list[str] = []
        _text_of(par, chunks)
        paragraphs.append("".join(chunks).rstrip())
    return tuple(paragraphs)


def _text_of(element: Any, chunks: list[str]) -> None:
    tag = _local(element.tag)
    if tag in ("attachmentref", "picture", "objectref", "pardef"):
        if element.tail:
            chunks.append(element.tail)
        return
    if tag == "break":
        chunks.append("\n")
    elif element.text:
        chunks.append(element.text)
    for child in element:
        _text_of(child, chunks)
    if element.tail and tag != "par":
        chunks.append(element.tail)


def parse_document(element: Any) -> NotesDocument:
    """One ``<document>`` element -> a NotesDocument value (pure; no file access)."""
    unid = ""
    created: str | None = None
    items: dict[str, tuple[str, ...]] = {}
    paragraphs: tuple[str, ...] = ()
    attachments: list[Attachment] = []
    mime: bytes | None = None
    defects: list[str] = []
    for child in element:
        tag = _local(child.tag)
        if tag == "noteinfo":
            unid = (child.get("unid") or "").upper()
            for sub in child:
                if _local(sub.tag) == "created":
                    created = "".join(sub.itertext()).strip() or None
        elif tag == "mime":  # DTD: <document> ( note.prolog, mime?, note.epilog ): a native MIME note
            mime = _mime_bytes("".join(child.itertext()), child.get("encoding"))
        elif tag == "item":
            name = (child.get("name") or "").casefold()
            for value in child:
                kind = _local(value.tag)
                if kind == "richtext" and name == "body":
                    paragraphs = _richtext_paragraphs(value)
                elif kind == "rawitemdata" and name == "body":
                    # DTD: the exporter writes <rawitemdata type='1'> when it cannot render rich text
                    defects.append("corps en texte riche non exporté par Domino (rawitemdata): message sans corps")
                elif kind == "mime":  # tolerated: older tools put the stream inside the Body item
                    mime = _mime_bytes("".join(value.itertext()), value.get("encoding"))
                elif kind == "object":
                    for file in value.iter():
                        if _local(file.tag) == "file":
                            attachment = _attachment(file, defects)
                            if attachment is not None:
                                attachments.append(attachment)
            if name != "$file":
                items[name] = items.get(name, ()) + _item_values(child)
    parent = element.get("parent")  # a response document names its parent's UNID here
    if parent and not items.get("$ref"):
        items["$ref"] = (parent,)
    return NotesDocument(
        unid=unid,
        form=element.get("form") or _form_item(items),
        items=items,
        body_paragraphs=paragraphs,
        attachments=tuple(attachments),
        mime=mime,
        created=created,
        defects=tuple(defects),
    )


def _attachment(file: Any, defects: list[str]) -> Attachment | None:
    """A ``<file>`` of a ``$FILE`` object (DTD: ``file ( created, modified, filedata? )``, the data
    Base64); None, with a defect, when its data is absent, not Base64, or left compressed by the
    exporter (``compression='huffman'|'lz1'``: Domino's own formats, not decoded here)."""
    name = file.get("name") or "piece-jointe"
    compression = (file.get("compression") or "none").lower()
    if compression != "none":
        defects.append(
            f"pièce jointe {name}: exportée compressée ({compression}), non jointe; réexporter sans compression"
        )
        return None
    data_el = next((d for d in file if _local(d.tag) == "filedata"), None)
    if data_el is None:
        defects.append(f"pièce jointe {name}: absente de l'export (filedata manquant)")
        return None
    try:
        data = base64.b64decode("".join(data_el.itertext()), validate=False)
    except (binascii.Error, ValueError):
        defects.append(f"pièce jointe illisible: {name}")
        return None
    return Attachment(name, data)


def _form_item(items: Mapping[str, tuple[str, ...]]) -> str:
    values = items.get("form", ())
    return values[0] if values else ""


def _mime_bytes(text: str, encoding: str | None) -> bytes:
    if encoding == "base64":
        return base64.b64decode(text)
    return text.lstrip("\r\n").encode("utf-8", "surrogateescape")


def iter_elements(path: Path) -> Iterator[tuple[str, Any]]:
    """("document"|"folder", element) pairs in file order, then ("error", message) if the file
    is damaged. Elements are cleared by the caller's next step (bounded memory)."""
    depth_stack: list[str] = []
    root: Any = None
    try:
        for event, element in iterparse(str(path), events=("start", "end"), forbid_dtd=False):
            tag = _local(element.tag)
            if event == "start":
                if root is None:
                    root = element
                depth_stack.append(tag)
                continue
            depth_stack.pop()
            if tag in ("document", "note") and len(depth_stack) <= 1:
                yield "document", element
                root.remove(element) if root is not element else None
            elif tag == "folder" and len(depth_stack) <= 1:
                yield "folder", element
                root.remove(element) if root is not element else None
    except ET.ParseError as exc:
        yield "error", f"export DXL tronqué ou invalide: {exc}"
    except OSError as exc:
        raise SourceRefused(f"cannot read {path}: {exc}") from exc


class DxlSource:
    """A DXL export as a MailSource (see ``sources.MailSource``).

    ``names`` maps canonical Notes names to Internet addresses; ``membership`` maps UNIDs to the
    folder titles they are filed in (overrides $FolderRefs), ``unfiled`` is where mail documents
    filed in no folder go when folder data exists (None: Domino's view rules).
    """

    kind = "dxl"

    def __init__(
        self,
        path: Path,
        *,
        names: Mapping[str, str] | None = None,
        membership: Mapping[str, tuple[str, ...]] | None = None,
        unfiled: str | None = None,
    ) -> None:
        if not path.is_file():
            raise SourceRefused(f"DXL export not found: {path}")
        self.path = path
        self.names = dict(names or {})
        self.membership = dict(membership or {})
        self.unfiled = unfiled
        self._index: _Index | None = None
        self.remarks: list[tuple[str, str]] = []

    # One pass over the export to learn folders, Message-IDs of parents and counts.
    def _scan(self) -> _Index:
        if self._index is None:
            self._index = _Index.build(self.path, self.membership, self.unfiled)
            self.remarks.extend(self._index.remarks)
        return self._index

    def folders(self) -> list[SourceFolder]:
        index = self._scan()
        result = []
        for title, count in sorted(index.counts.items()):
            path = tuple(p for p in title.split("\\") if p)
            result.append(
                SourceFolder(
                    path=path,
                    native=title,
                    role=Role.NONE,
                    estimated_count=count,
                    estimated_bytes=index.sizes.get(title, 0),
                )
            )
        return result

    def messages(self, folder: SourceFolder, after: str | None = None) -> Iterator[SourceItem]:
        index = self._scan()
        ordinal = -1
        start = int(after) if after else -1
        for kind, element in iter_elements(self.path):
            if kind == "error":
                if folder.native == index.damage_folder:
                    yield SourceDamage(position=f"{ordinal + 1:09d}", kind="dxl_tronque", detail=str(element))
                return
            if kind != "document":
                continue
            doc = parse_document(element)
            element.clear()
            if not doc.is_mail:
                continue
            ordinal += 1
            if ordinal <= start or folder.native not in index.folders_of(doc):
                continue
            position = f"{ordinal:09d}"
            parent = index.parent_mids.get(doc.first("$Ref") or "")
            try:
                converted = convert_document(doc, names=self.names, parent_message_id=parent)
            except (ValueError, TypeError, LookupError) as exc:
                yield SourceDamage(position, "document_illisible", f"{doc.unid}: {exc}")
                continue
            yield SourceMessage(
                position=position,
                raw=converted.raw,
                flags=converted.flags,
                internaldate=converted.internaldate,
                notes=tuple(f"{doc.unid}: {n}" for n in converted.notes),
            )

    def close(self) -> None:
        pass


class _Index:
    """What one scan of the export learns: folder titles by UNID, per-document membership."""

    def __init__(self) -> None:
        self.folder_titles: dict[str, str] = {}
        self.doc_refs: dict[str, tuple[str, ...]] = {}
        self.doc_hint: dict[str, str] = {}
        self.parent_mids: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.membership: Mapping[str, tuple[str, ...]] = {}
        self.unfiled: str | None = None
        self.remarks: list[tuple[str, str]] = []
        self.damage_folder: str | None = None
        self.skipped_forms: dict[str, int] = {}

    @classmethod
    def build(cls, path: Path, membership: Mapping[str, tuple[str, ...]], unfiled: str | None) -> _Index:
        index = cls()
        index.membership = membership
        index.unfiled = unfiled
        referenced: set[str] = set()
        mids: dict[str, str] = {}
        docs: list[tuple[str, int]] = []
        damaged = False
        for kind, element in iter_elements(path):
            if kind == "error":  # reported as a SourceDamage where reading stops
                damaged = True
                break
            if kind == "folder":
                unid = next((c.get("unid") for c in element if _local(c.tag) == "noteinfo"), None)
                title = element.get("name") or ""
                if unid:
                    index.folder_titles[unid.upper()] = title.split("|", 1)[0]
                element.clear()
                continue
            doc = parse_document(element)
            size = sum(len(a.data) for a in doc.attachments) + sum(len(p) for p in doc.body_paragraphs) + 1024
            element.clear()
            if not doc.is_mail:
                index.skipped_forms[doc.form or "?"] = index.skipped_forms.get(doc.form or "?", 0) + 1
                continue
            refs = doc.values("$FolderRefs", "$FolderRef")
            if refs:
                index.doc_refs[doc.unid] = tuple(r.upper() for r in refs)
            index.doc_hint[doc.unid] = default_role_hint(doc)
            mid = doc.first("$MessageID")
            if mid:
                mids[doc.unid] = mid
            ref = doc.first("$Ref")
            if ref:
                referenced.add(ref.upper())
            docs.append((doc.unid, size))
        index.parent_mids = {u: m for u, m in mids.items() if u in referenced}
        for form, count in sorted(index.skipped_forms.items()):
            index.remarks.append(("document_non_courriel", f"{count} document(s) de forme {form!r} non migré(s)"))
        for unid, size in docs:
            for title in index.folders_of_unid(unid):
                index.counts[title] = index.counts.get(title, 0) + 1
                index.sizes[title] = index.sizes.get(title, 0) + size
        if damaged:
            index.damage_folder = (
                "($Inbox)" if "($Inbox)" in index.counts or not index.counts else sorted(index.counts)[0]
            )
            index.counts.setdefault(index.damage_folder, 0)
        return index

    def folders_of(self, doc: NotesDocument) -> tuple[str, ...]:
        return self.folders_of_unid(doc.unid)

    def folders_of_unid(self, unid: str) -> tuple[str, ...]:
        if unid in self.membership:
            return self.membership[unid]
        refs = self.doc_refs.get(unid)
        if refs:
            titles = tuple(self.folder_titles[r] for r in refs if r in self.folder_titles)
            if titles:
                return titles
        hint = self.doc_hint.get(unid, "($Inbox)")
        has_folder_data = bool(self.membership) or bool(self.doc_refs)
        if has_folder_data and self.unfiled and hint == "($Inbox)":
            return (self.unfiled,)
        return (hint,)


def read_membership(path: Path) -> dict[str, tuple[str, ...]]:
    """A membership file: ``UNID;Folder\\Sub`` lines (CSV, ';' or ','), or a directory of folder
    views exported as XML (``<viewentries><viewentry unid=...>``), the file name giving the folder
    (``Dossiers\\Réclamations.xml``, or ``Dossiers#Réclamations.xml`` where '\\' cannot be used)."""
    result: dict[str, list[str]] = {}
    if path.is_dir():
        for file in sorted(path.glob("*.xml")):
            title = file.stem.replace("#", "\\")
            try:
                for _event, element in iterparse(str(file), events=("end",)):
                    if _local(element.tag) == "viewentry" and element.get("unid"):
                        result.setdefault(element.get("unid").upper(), []).append(title)
                        element.clear()
            except ET.ParseError as exc:
                raise SourceRefused(f"folder view {file} is not valid XML: {exc}") from exc
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise SourceRefused(f"cannot read {path}: {exc}") from exc
        dialect = ";" if text.count(";") >= text.count(",") else ","
        for row in csv.reader(io.StringIO(text), delimiter=dialect):
            if len(row) >= 2 and row[0].strip() and not row[0].startswith("#") and row[0].strip().lower() != "unid":
                result.setdefault(row[0].strip().upper(), []).append(row[1].strip())
    return {k: tuple(v) for k, v in result.items()}


def read_names(path: Path) -> dict[str, str]:
    """A names file: ``Notes name;address`` lines (CSV, ';' or ','), first line may be a header."""
    from balf.bridge.notes import canonical_name

    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SourceRefused(f"cannot read {path}: {exc}") from exc
    dialect = ";" if text.count(";") >= text.count(",") else ","
    names: dict[str, str] = {}
    for row in csv.reader(io.StringIO(text), delimiter=dialect):
        if len(row) >= 2 and "@" in row[1] and not row[0].startswith("#"):
            names[canonical_name(row[0])] = row[1].strip()
    return names


__all__ = ["DxlSource", "parse_document", "read_membership", "read_names", "iter_elements"]
