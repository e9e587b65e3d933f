"""The usage ledger: billable events, the group-commit writer, rollups, partitions and reports."""
