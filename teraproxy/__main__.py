from teraproxy.cli import main

raise SystemExit(main())
