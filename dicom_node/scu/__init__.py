"""Everything that opens an association to a peer as an SCU: result delivery (C-STORE),
C-ECHO, the debug sender, and the TLS client context they share.  ``scu.association`` is the
one place an SCU association is opened, released or given up on.
"""
