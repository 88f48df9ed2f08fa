"""The bascule: migration of Lotus-style BALF mailboxes (IMAP, mbox, Maildir, EML trees, Domino DXL) into IMAP.

Pure modules: ``model``, ``errors``, ``keys``, ``folders``, ``notes``, ``campaign``, ``report``.
Edges (I/O): ``files`` and ``dxl`` (read sources), ``imapsource`` and ``imaptarget`` (imapclient),
``store`` (the database), ``migrate`` and ``verify`` (orchestration), ``progress`` (the terminal).
"""
