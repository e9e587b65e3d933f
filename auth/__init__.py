"""Authentication, authorization and accounting: the system of record for modelgate."""
