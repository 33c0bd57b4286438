from spineseg.cli import main

raise SystemExit(main())
