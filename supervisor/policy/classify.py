"""Classification, a pure function from recorded evidence to the error catalogue, lives
with the catalogue (`schemas.catalogue`) so that the audit can re-run it over history; the
executor's side names it here."""

from schemas.catalogue import Classification, catalogue_entry, classify, signal_name

__all__ = ["Classification", "catalogue_entry", "classify", "signal_name"]
