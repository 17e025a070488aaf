"""The durable queue: a generation being run holds a lease (its worker, until when).

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(128)))
        batch.add_column(sa.Column("lease_expires", sa.Float))
    op.create_index("ix_generations_queue", "generations", ["status", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_generations_queue", "generations")
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("lease_expires")
        batch.drop_column("lease_owner")
